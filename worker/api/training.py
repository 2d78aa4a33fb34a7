"""Continual-learning HTTP routes (`docs/training-api.md`): feedback, training jobs.

Who may call them (`worker/api/auth.py`): the job routes need the admin token (a job publishes versions of a
served adapter, writes checkpoints and can create an adapter); `/v1/feedback` takes the feedback key and is
accepted only for an adapter that has a training job in this worker's pool, or that `--feedback-adapter` names.

Why the thread pool: a feedback 2xx promises durability, so the handler fsyncs before answering; that disk wait
(and every blocking wait on the engine thread) runs in Starlette's thread pool, off the event loop. Job creation/deletion run in the engine
thread between iterations (`runner.call_threadsafe`), which is what makes version switches and job stops atomic
with respect to serving.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from lorafleet.worker.api.auth import is_admin, require_admin, require_feedback_key
from lorafleet.worker.api.body_guard import PARSED
from lorafleet.worker.api.errors import APIError
from lorafleet.worker.feedback.request import FeedbackRequest
from lorafleet.worker.feedback.store import FeedbackSample
from lorafleet.worker.names import InvalidName, adapter_name, job_name
from lorafleet.worker.training.service import JobConflict, TrainingService, register
from lorafleet.worker.training.spec import JobRequest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

router = APIRouter()
MAX_FEEDBACK_BODY = 256 << 10
MAX_FEEDBACK_TOKENS = 4096
MAX_JOB_BODY = 1 << 20
BODY_LIMITS = {"/v1/feedback": MAX_FEEDBACK_BODY, "/v1/training/jobs": MAX_JOB_BODY}  # the app's body guard
MAX_FEEDBACK_LABELS = 64  # adapters with their own `lorafleet_feedback_total` series; the rest count as "other"
_attach_lock = threading.Lock()


def attach(app, data_dir=None) -> TrainingService:
    """The app's training service: the one `worker/main.py` registered (`create_app(training=)`), else one
    registered now (idempotent; call at app creation so the request log sees all traffic)."""
    with _attach_lock:
        svc = getattr(app.state, "training", None)
        if svc is None:
            metrics = getattr(app.state, "metrics", None)
            svc = register(app.state.runner, getattr(metrics, "registry", None), data_dir)
            app.state.training = svc
        return svc


def _service(request: Request) -> TrainingService:
    svc = attach(request.app)
    if not svc.wait_ready(60):
        raise APIError(503, f"training is not available: {svc.setup_error or 'engine still loading'}")
    return svc


def _validation_error(exc: ValidationError) -> APIError:
    errs = exc.errors()
    first = errs[0] if errs else {"msg": "invalid body", "loc": ()}
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = first.get("msg", "invalid body")
    # model-level shape rules (kind/field combinations) are 400; field schema violations are 422
    status = 400 if not first.get("loc") else 422
    return APIError(status, f"{loc + ': ' if loc else ''}{msg}", param=loc or None)


def _body(request: Request) -> dict:
    """The JSON object the body guard parsed (body_guard.py bounds the size per path in BODY_LIMITS and refuses what
    is not strict JSON); the bytes are never parsed a second time."""
    data = request.scope.get(PARSED)
    if not isinstance(data, dict):
        raise APIError(400, "body must be a JSON object")
    return data


def _tokenize(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _label(svc: TrainingService, adapter: object, accepted: bool) -> str:
    """The `adapter` label of a feedback count: an adapter with a job, or one of the first MAX_FEEDBACK_LABELS
    accepted ones; anything else (invented names in rejected posts) is "other", so labels stay bounded."""
    seen: set[str] = svc.feedback_labels
    if isinstance(adapter, str) and adapter in seen:
        return adapter
    if isinstance(adapter, str) and (svc.has_job_for(adapter) or accepted) and len(seen) < MAX_FEEDBACK_LABELS:
        seen.add(adapter)
        return adapter
    return "other"


def _allowed(request: Request, svc: TrainingService, adapter: str) -> None:
    """Feedback is stored only for an adapter someone trains (a job in the pool) or that the operator allows; the
    admin token (the operator, or a platform collecting feedback before it starts a job) may store it for any."""
    allow = request.app.state.settings.feedback_adapters
    if "*" in allow or adapter in allow or svc.has_job_for(adapter) or is_admin(request):
        return
    raise APIError(
        404, f"adapter {adapter!r} has no training job in this pool and is not in --feedback-adapter", param="adapter"
    )


@router.post("/v1/feedback", status_code=202, dependencies=[Depends(require_feedback_key)])
async def post_feedback(request: Request) -> JSONResponse:
    svc = await run_in_threadpool(_service, request)
    data: dict = {}
    try:
        data = _body(request)
        sample = await run_in_threadpool(_sample, svc, data)  # validating and tokenizing are CPU work: off the loop
        _allowed(request, svc, sample.adapter)
    except APIError:
        svc.metrics.feedback.labels(_label(svc, data.get("adapter"), False), "rejected").inc()
        raise
    try:
        stored = await run_in_threadpool(svc.add_feedback, sample)  # written + fsynced before we answer
    except OSError as exc:  # a full or failing disk: not stored, so not acknowledged; the client retries
        svc.metrics.feedback.labels(_label(svc, sample.adapter, False), "rejected").inc()
        raise APIError(503, f"feedback cannot be stored now ({exc.strerror or type(exc).__name__})") from exc
    svc.metrics.feedback.labels(_label(svc, stored.adapter, True), "accepted").inc()
    return JSONResponse(
        {"feedbackId": stored.feedback_id, "adapter": stored.adapter, "trainable": stored.trainable, "seq": stored.seq},
        status_code=202,
    )


def _sample(svc: TrainingService, data: dict) -> FeedbackSample:
    """The stored form of a feedback body (up to 256 KiB: validated with its tokenization, in the thread pool)."""
    try:
        fb = FeedbackRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    return _resolve(svc, fb)


def _resolve(svc: TrainingService, fb: FeedbackRequest) -> FeedbackSample:
    tok = svc.runner.engine.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    if fb.kind == "pair":
        try:
            adapter_name(fb.adapter)
        except InvalidName as exc:
            raise APIError(400, str(exc), param="adapter") from exc
        if fb.messages is not None:
            try:
                text = tok.apply_chat_template(fb.messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - template errors are the client's
                raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
            prompt_ids = _tokenize(tok, text)
        else:
            prompt_ids = _tokenize(tok, fb.prompt or "")
        completion_ids = _tokenize(tok, fb.completion or "") + ([eos] if isinstance(eos, int) else [])
        adapter, request_id, version, weight = fb.adapter or "", None, None, 1.0
        if not prompt_ids:
            raise APIError(400, "prompt is empty after tokenization", param="prompt")
    else:
        rec = svc.finished_request(fb.requestId or "")
        if rec is None:
            raise APIError(404, f"request {fb.requestId!r} was not served here or expired from the request log")
        if rec.lora_name is None:
            raise APIError(400, f"request {fb.requestId!r} was served by the base model, not an adapter")
        if fb.adapter is not None and fb.adapter != rec.lora_name:
            raise APIError(400, f"request {fb.requestId!r} was served by adapter {rec.lora_name!r}", param="adapter")
        adapter, request_id, version = rec.lora_name, rec.request_id, rec.lora_version
        prompt_ids = list(rec.prompt_token_ids)
        completion_ids = list(rec.output_token_ids)
        weight = 1.0
        if fb.kind == "correction":
            completion_ids = _tokenize(tok, fb.completion or "") + ([eos] if isinstance(eos, int) else [])
        elif fb.kind == "reject":
            weight = 0.0
        elif fb.kind == "reward":
            weight = max(0.0, float(fb.reward or 0.0))
        if not completion_ids:
            raise APIError(400, f"request {fb.requestId!r} has no completion to train on")
    if len(prompt_ids) + len(completion_ids) > MAX_FEEDBACK_TOKENS:
        raise APIError(413, f"feedback has {len(prompt_ids) + len(completion_ids)} tokens (max {MAX_FEEDBACK_TOKENS})")
    return FeedbackSample(
        adapter=adapter,
        kind=fb.kind,
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        weight=weight,
        request_id=request_id,
        served_version=_version_number(version),
    )


def _version_number(v: str | None) -> int | None:
    if v and v.startswith("v") and v[1:].isdigit():
        return int(v[1:])
    return None


def _job_name(name: str) -> str:
    try:
        return job_name(name)
    except InvalidName as exc:
        raise APIError(400, str(exc), param="name") from exc


@router.post("/v1/training/jobs", status_code=201, dependencies=[Depends(require_admin)])
async def post_job(request: Request) -> JSONResponse:
    svc = await run_in_threadpool(_service, request)
    data = _body(request)
    try:
        req = JobRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    try:
        job = await svc.runner.call(lambda _e: svc.create_job(req))
    except JobConflict as exc:
        raise APIError(409, str(exc)) from exc
    except (ValueError, KeyError) as exc:
        raise APIError(400, f"cannot start job: {exc}") from exc
    return JSONResponse(job.status(), status_code=201)


@router.get("/v1/training/jobs", dependencies=[Depends(require_admin)])
def list_jobs(request: Request) -> dict:
    return {"jobs": _service(request).list_status()}


@router.get("/v1/training/jobs/{name}", dependencies=[Depends(require_admin)])
def get_job(request: Request, name: str) -> dict:
    st = _service(request).job_status(_job_name(name))
    if st is None:
        raise APIError(404, f"training job {name!r} not found")
    return st


@router.delete("/v1/training/jobs/{name}", dependencies=[Depends(require_admin)])
async def delete_job(request: Request, name: str) -> dict:
    _job_name(name)
    svc = await run_in_threadpool(_service, request)
    st = await svc.runner.call(lambda _e: svc.delete_job(name))
    if st is None:
        raise APIError(404, f"training job {name!r} not found")
    return st
