from pathlib import Path

from examples.model_repository import build

folder = build()
shown = folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
print(f"wrote the model file and labels of {shown}")
