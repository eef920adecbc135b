"""A text task in one module: positive or negative sentiment of an English text.

The model is a bag of words built at load, with no download: each word of a small
lexicon weighs +1 or -1 (a "not" just before a word flips it), and one
``nn.EmbeddingBag`` scores the whole batch. Small, but a real batched torch model.

    TASKS=examples.sentiment:Sentiment make run
    curl -s localhost:5001/sentiment -H 'content-type: application/json' \\
        -d '{"text": "What a wonderful, friendly place"}'
"""

import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from serving import InputError, LoadContext, NoOptions, Payload, Task
from serving.tensors import TensorForm, TensorSpec, text_tensor

# fmt: off
POSITIVE = ("good", "great", "excellent", "wonderful", "lovely", "love", "loved", "like",
            "liked", "happy", "friendly", "fast", "amazing", "best", "fantastic", "perfect",
            "delightful", "pleasant", "beautiful", "enjoyed", "fun", "helpful")
NEGATIVE = ("bad", "awful", "terrible", "horrible", "hate", "hated", "dislike", "sad",
            "rude", "slow", "worst", "boring", "broken", "ugly", "disappointing", "poor",
            "annoying", "useless", "angry", "dirty", "noisy")
# fmt: on
NEGATIONS = frozenset({"not", "never", "no", "isn't", "wasn't", "don't", "didn't"})
MAX_CHARS = 10_000
_WORD = re.compile(r"[a-z']+")


@dataclass(frozen=True)
class Text:
    """A text as the model reads it: the ids of its lexicon words, and their signs."""

    ids: list[int]
    signs: list[float]


class SentimentResult(BaseModel):
    label: str = Field(description="positive, negative, or neutral when no word is known")
    score: float = Field(description="Probability that the text is positive")
    words: int = Field(description="Lexicon words found")


class Sentiment(Task[Text, tuple[float, int]]):
    """Positive or negative: send `{"text": "..."}`, or a UTF-8 text file as `file`."""

    name = "sentiment"
    Response = SentimentResult
    jobs_field = "texts"
    json_schema: ClassVar[dict[str, Any] | None] = {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}},
    }

    def load(self, context: LoadContext) -> None:
        words = ["<unknown>", *POSITIVE, *NEGATIVE]
        self.vocabulary = {word: i for i, word in enumerate(words)}
        weights = torch.tensor([[0.0]] + [[1.0]] * len(POSITIVE) + [[-1.0]] * len(NEGATIVE))
        self.device = torch.device(context.device)
        self.bag = nn.EmbeddingBag.from_pretrained(weights, mode="sum").to(self.device)

    def decode(self, payload: Payload, options: BaseModel) -> Text:
        # A file arrives as bytes, a JSON body as {"text": ...}, a JSON job item as a string.
        text: Any = payload.get("text") if isinstance(payload, dict) else payload
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("the file is not UTF-8 text", 415) from None
        if not isinstance(text, str):
            raise InputError('send {"text": "<a string>"}', 422)
        if len(text) > MAX_CHARS:
            raise InputError(f"the text has {len(text)} characters; the limit is {MAX_CHARS}", 413)
        ids: list[int] = []
        signs: list[float] = []
        negated = False
        for word in _WORD.findall(text.lower()):
            if word in NEGATIONS:
                negated = True
                continue
            if word in self.vocabulary:
                ids.append(self.vocabulary[word])
                signs.append(-1.0 if negated else 1.0)
            negated = False
        return Text(ids, signs)

    def predict_batch(self, items: list[Text]) -> list[tuple[float, int] | Exception]:
        # One flat list of words; each text's bag starts at its offset.
        ids = torch.tensor([i for item in items for i in item.ids] or [0], dtype=torch.long)
        signs = torch.tensor([s for item in items for s in item.signs] or [0.0])
        offsets = torch.tensor([0, *accumulate(len(item.ids) for item in items)][:-1])
        with torch.inference_mode():
            sums = self.bag(
                ids.to(self.device),
                offsets.to(self.device),
                per_sample_weights=signs.to(self.device),
            )
        scores = torch.sigmoid(2 * sums[:, 0]).tolist()
        return [(score, len(item.ids)) for score, item in zip(scores, items, strict=True)]

    def encode(self, result: tuple[float, int], options: BaseModel) -> SentimentResult:
        score, words = result
        label = "neutral" if words == 0 else "positive" if score > 0.5 else "negative"
        return SentimentResult(label=label, score=round(score, 4), words=words)

    def example(self) -> Text:
        return self.decode({"text": "a good, friendly and not at all boring example"}, NoOptions())

    def describe(self) -> dict[str, Any]:
        return {"name": "lexicon bag of words", "vocabulary": len(self.vocabulary)}

    # Over the Open Inference Protocol: one UTF-8 text per row, as a file would carry it.
    def tensor_form(self) -> TensorForm:
        return TensorForm(
            inputs=(TensorSpec("text", "BYTES", (-1, 1)),),
            outputs=(
                TensorSpec("label", "BYTES", (-1, 1)),
                TensorSpec("score", "FP32", (-1, 1)),
                TensorSpec("words", "INT64", (-1, 1)),
            ),
        )

    def tensor_outputs(
        self, results: list[tuple[float, int]], options: BaseModel
    ) -> dict[str, np.ndarray]:
        answers = [self.encode(result, options) for result in results]
        return {
            "label": text_tensor([[answer.label] for answer in answers]),
            "score": np.array([[answer.score] for answer in answers], dtype=np.float32),
            "words": np.array([[answer.words] for answer in answers], dtype=np.int64),
        }
