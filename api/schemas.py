"""Response bodies."""

from pydantic import BaseModel

from classification import ClassScore


class ClassPrediction(BaseModel):
    class_id: int
    label: str
    score: float


class Classification(BaseModel):
    prediction: ClassPrediction
    top_k: list[ClassPrediction]

    @classmethod
    def from_scores(cls, scores: list[ClassScore]) -> "Classification":
        ranked = [
            ClassPrediction(class_id=s.class_id, label=s.label, score=s.score) for s in scores
        ]
        return cls(prediction=ranked[0], top_k=ranked)


class ErrorBody(BaseModel):
    detail: str
