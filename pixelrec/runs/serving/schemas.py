"""The typed request and response bodies of the HTTP API (they make the OpenAPI schema at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import MAX_QUERIES_PER_REQUEST
from .engine import RecommendAnswer, RecommendQuery, SimilarAnswer

_K = "How many items to return: 1 up to the number of items in the index."


class RecommendRequest(BaseModel):
    """A user of the run (their whole history is the query) or an ad-hoc history of item ids.

    Types are strict: ids are JSON strings, `k` a JSON integer, `exclude_history` true or false;
    `"k": "10"`, `"k": true` or a number as an id are refused with 422, never converted."""

    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: str | None = Field(None, description="A user id of the run's data.", examples=["u1"])
    history: list[str] | None = Field(None, description="Item ids, oldest first.", examples=[["i1", "i7"]])
    k: int = Field(10, description=_K, json_schema_extra={"minimum": 1})
    exclude_history: bool = Field(True, description="Leave the history's items out of the results.")

    @model_validator(mode="after")
    def _one_query(self) -> "RecommendRequest":
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self

    def query(self) -> RecommendQuery:
        history = None if self.history is None else tuple(self.history)
        return RecommendQuery(self.user_id, history, self.k, self.exclude_history)


class RecommendResponse(BaseModel):
    """Top-k items, best first, with their scores (the same as `pixelrec retrieve`)."""

    user_id: str | None
    history: list[str] = Field(description="The query's items, oldest first.")
    items: list[str]
    scores: list[float]
    warm: list[bool] = Field(description="Per item: whether it had training interactions (false: a cold item, "
                                         "never in training or added after it).")
    history_used: int = Field(description="The most recent history items the model read (at most its max length).")
    history_truncated: bool = Field(description="True when the history is longer than the model's max length: "
                                                "only its last items were read (all of them are still excluded).")
    index_version: int = Field(description="The run's publication the answer comes from.")

    @classmethod
    def of(cls, answer: RecommendAnswer) -> "RecommendResponse":
        return cls(**vars(answer))


class BatchRequest(BaseModel):
    """Many queries answered together in one request."""

    model_config = ConfigDict(strict=True, extra="forbid")

    queries: list[RecommendRequest] = Field(min_length=1, max_length=MAX_QUERIES_PER_REQUEST)


class BatchResponse(BaseModel):
    results: list[RecommendResponse] = Field(description="One result per query, in order.")


class SimilarResponse(BaseModel):
    """The items nearest to one item by the run's item vectors (the item itself excluded)."""

    item_id: str
    items: list[str]
    scores: list[float] = Field(description="Cosine similarities (metric cosine) or inner products (metric ip).")
    warm: list[bool] = Field(description="Per item: whether it had training interactions.")
    item_warm: bool = Field(description="Whether the query's item had training interactions.")
    metric: str = Field(description='"cosine" (the default) or "ip".')
    index_version: int

    @classmethod
    def of(cls, answer: SimilarAnswer) -> "SimilarResponse":
        return cls(**vars(answer))


class AddedItem(BaseModel):
    item_id: str
    index_id: int = Field(description="The item's id in the run's index (new ids are never reused).")


class AddItemsResponse(BaseModel):
    """What an upload of covers did; the added items are searchable when this returns."""

    added: list[AddedItem]
    skipped: list[str] = Field(description="Ids the run already has; their vectors are kept.")
    failed: dict[str, str] = Field(description="Item id -> why its cover could not be encoded.")
    items: int = Field(description="Items in the index now.")
    index_version: int


class Health(BaseModel):
    status: str
    run_dir: str
    items: int
    index_version: int
    image_tower: bool = Field(description="Whether POST /items can encode covers for this run.")
    ingestion: str = Field(description='What POST /items takes: "open" (loopback, no key), "api-key" (requests '
                                       'carrying the --api-key token) or "off" (--read-only, or beyond loopback '
                                       'without a key).')


class RunSummary(BaseModel):
    """The run being served (what the browsing page shows above its results)."""

    run_dir: str
    model: str = Field(description="Sequence model (sasrec, ...).")
    tower: str = Field(description="Item tower: id, frozen, partial, e2e or hybrid.")
    encoder: str | None = Field(description="The image encoder behind the item tower (None for an id run).")
    dim: int
    max_len: int
    users: int
    items: int = Field(description="Items in the index now (added items included).")
    trained_items: int = Field(description="Items of the training vocabulary.")
    index_version: int
    best_epoch: int
    test: dict | None = Field(description="Test metrics of the published model (results.json), None when the "
                                          "run has none.")
    covers: str = Field(description="Where the training covers are read from, or why there are none.")
    image_tower: bool
    ingestion: str = Field(description='What POST /items takes: "open", "api-key" or "off".')


class Latency(BaseModel):
    p50: float | None = Field(description="Milliseconds, over the most recent query requests.")
    p99: float | None
    window: int = Field(description="How many requests the percentiles cover.")


class StatsResponse(BaseModel):
    items: int
    users: int
    index_version: int
    requests: int = Field(description="Query requests answered (recommend, batch, similar).")
    queries: int = Field(description="Queries answered: a batch request counts each of its queries.")
    refused: int = Field(description="Query requests refused with a 4xx status.")
    batches: int = Field(description="Micro-batches computed (0 when micro-batching is off).")
    mean_batch_size: float | None
    added_items: int = Field(description="Items added through POST /items since this process started.")
    uptime_s: float
    batch_window_ms: float
    latency_ms: Latency


class Problem(BaseModel):
    """Every error: one line saying what was wrong."""

    detail: str
