"""Run an engine over a dataset: one verdict per distinct video, appended to `predictions.jsonl`
as it finishes, so an interrupted run resumes where it stopped.

Locally one engine judges the videos in dataset order, `batch` videos per `check_batch` call.
With Ray, `RayOptions.workers` actors each build the same engine from one `EngineSpec` and judge
groups of videos as they free up; lines are appended in completion order, and both paths call
`judge_group`, so the verdicts are the same.

    spec = EngineSpec(model="/tmp/m", policies=load_policy("policies/safewatch.yaml"))
    result = run(load_dataset("bench/data"), spec, "out/")
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.bench.datasets import Dataset, Item
from guardrail.bench.predictions import (
    FAILED,
    PREDICTIONS,
    LineWriter,
    read_predictions,
    repair_tail,
)
from guardrail.errors import UsageError, VideoError
from guardrail.policy import PolicySet

if TYPE_CHECKING:
    from guardrail.engine import Progress

RUN_FILE = "run.json"
RUN_FORMAT = "guardrail-bench-run/1"


@dataclass(frozen=True)
class EngineSpec:
    """What one engine is built from. Picklable, so every Ray worker builds the same engine."""

    model: str | None
    policies: PolicySet
    device: str = "auto"
    dtype: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()    # EngineConfig fields: (("layout", "parallel"),)
    engine: str = "transformers"                 # transformers | vllm
    vllm: tuple[tuple[str, Any], ...] = ()       # vLLM settings (engine vllm)

    def build(self):
        from guardrail.engine import GuardEngine

        return GuardEngine.from_pretrained(self.model, policies=self.policies, device=self.device,
                                           dtype=self.dtype, engine=self.engine,
                                           vllm=dict(self.vllm) or None, **dict(self.options))

    def settings(self) -> dict:
        """JSON-able description; a resumed run must match it."""
        options = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                   for k, v in self.options}
        return {"model": self.model, "policy_set": self.policies.name,
                "policy_fingerprint": self.policies.fingerprint(), "device": self.device,
                "dtype": self.dtype, **options,
                # the default engine is left out, so runs begun before engines existed resume
                **({"engine": self.engine} if self.engine != "transformers" else {}),
                **({"vllm": dict(self.vllm)} if self.vllm else {})}


@dataclass(frozen=True)
class RayOptions:
    workers: int = 2                 # actors, one engine each
    num_cpus: float = 1.0            # per actor
    num_gpus: float = 0.0            # per actor
    address: str | None = None       # None: the running Ray, else start a local one


@dataclass(frozen=True)
class Outcome:
    """One video's result: a verdict (as JSON) or an error {"type", "message"}."""

    video_path: str
    verdict: dict | None
    error: dict | None


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    judged: int                      # verdicts written by this call
    failed: int                      # failures recorded by this call
    skipped: int                     # videos already in predictions.jsonl
    elapsed_s: float                 # judging time of this call (engine loading excluded)
    input_wait_s: float | None = None  # of it, the engine waiting for decoded videos (local)


# failures, (i, Video, ms), and the readable videos prepared for the engine (None: not done)
Decoded = tuple[dict[int, "Outcome"], list[tuple[int, Any, float]], Any]


def decode_group(config, items: list[Item], prepare: Callable | None = None) -> Decoded:
    """Decode each video of a group on its own (a bad one fails alone): the error outcomes by
    position, (position, Video, decode ms) of the readable ones, and `prepare` (an engine's
    `prepare_or_none`) of those. No model work: runs ahead of the engine
    (`guardrail.video.prefetch`)."""
    from guardrail.video import load_video

    outcomes: dict[int, Outcome] = {}
    decoded: list[tuple[int, Any, float]] = []
    for i, item in enumerate(items):
        if not item.exists:
            outcomes[i] = _missing(item)
            continue
        t0 = time.perf_counter()
        try:
            video = load_video(item.path, config.sampling, config.limits, config.decoder)
        except (VideoError, OSError) as error:
            outcomes[i] = _failed(item, error)
            continue
        decoded.append((i, video, (time.perf_counter() - t0) * 1e3))
    prepared = prepare([video for _, video, _ in decoded]) if prepare is not None else None
    return outcomes, decoded, prepared


def judge_decoded(engine, items: list[Item], ready: Decoded,
                  progress: Progress | None = None) -> list[Outcome]:
    """Outcomes of a decoded group in input order: the readable videos share `check_batch`
    (windows batched per forward pass)."""
    outcomes, decoded, prepared = dict(ready[0]), ready[1], ready[2]
    verdicts = engine.check_batch(prepared or [video for _, video, _ in decoded],
                                  progress=progress) if decoded else []
    for (i, _, ms), verdict in zip(decoded, verdicts, strict=True):
        data = verdict.model_dump(mode="json")
        data["timing_ms"]["decode_video"] += ms      # decoded here, not inside check_batch
        data["timing_ms"]["total"] += ms
        outcomes[i] = Outcome(items[i].video_path, data, None)
    return [outcomes[i] for i in range(len(items))]


def judge_group(engine, items: list[Item], progress: Progress | None = None) -> list[Outcome]:
    """`decode_group` then `judge_decoded`, one after the other."""
    return judge_decoded(engine, items, decode_group(engine.config, items), progress)


def _missing(item: Item) -> Outcome:
    return Outcome(item.video_path, None, {"type": "missing", "message": "no such file"})


def _failed(item: Item, error: Exception) -> Outcome:
    kind = getattr(error, "kind", type(error).__name__)
    return Outcome(item.video_path, None, {"type": kind, "message": str(error)})


def groups(items: list[Item], size: int) -> list[list[Item]]:
    return [items[i: i + size] for i in range(0, len(items), max(1, size))]


def run(dataset: Dataset, spec: EngineSpec, out_dir: str | Path, ray: RayOptions | None = None,
        batch: int = 1, on_done: Callable[[Outcome], None] | None = None,
        on_start: Callable[[int, int], None] | None = None,
        on_group: Callable[[int], Progress] | None = None, prefetch: int = 2) -> RunResult:
    """Judge every video of `dataset` not yet in `out_dir/predictions.jsonl`, `batch` videos per
    engine call. `on_start(todo, done)` is called once the engines are ready, `on_done` after
    each video; locally, `on_group(n)` gives the engine's progress callback for a call judging
    n videos (windows are reported as they finish; Ray workers report per video only).
    Locally, `prefetch` groups are decoded ahead of the engine (0: one after the other)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, dataset, spec)
    repair_tail(out / PREDICTIONS)
    repair_tail(out / FAILED)
    done = read_predictions(out / PREDICTIONS)[0] if (out / PREDICTIONS).is_file() else {}
    todo = [item for item in dataset.videos() if item.video_path not in done]
    by_path = {item.video_path: item for item in todo}
    judged = failed = 0
    elapsed = 0.0
    judges = _judges(spec, groups(todo, batch), ray, on_group, prefetch)
    with judges as stream, \
            LineWriter(out / PREDICTIONS) as preds, LineWriter(out / FAILED) as fails:
        if on_start:
            on_start(len(todo), len(done))
        t0 = time.perf_counter()
        for outcome in stream:
            labels = list(by_path[outcome.video_path].labels)
            if outcome.verdict is not None:
                preds.write({**outcome.verdict, "video_path": outcome.video_path,
                             "labels": labels})
                judged += 1
            else:
                fails.write({"video_path": outcome.video_path, "labels": labels,
                             "error": outcome.error})
                failed += 1
            if on_done:
                on_done(outcome)
        elapsed = time.perf_counter() - t0
    _record_session(out, judged, failed, len(done), elapsed, ray)
    waited = judges.feed.waited_s if judges.feed is not None else None
    return RunResult(out, judged, failed, len(done), elapsed, waited)


# ----------------------------------------------------------------------------- judges

class _judges:
    """`with _judges(spec, groups, ray) as stream:` outcomes for every video of `groups`, engines
    loaded on enter."""

    def __init__(self, spec: EngineSpec, groups: list[list[Item]], ray: RayOptions | None,
                 on_group: Callable[[int], Progress] | None = None, ahead: int = 2):
        self.spec, self.groups, self.ray, self.on_group = spec, groups, ray, on_group
        self.ahead = ahead                  # groups decoded ahead of the engine (local runs)
        self.pool: _RayPool | None = None
        self.feed = None                    # the local prefetch (its waited_s: input stalls)

    def __enter__(self) -> Iterable[Outcome]:
        if not self.groups:
            return iter(())
        if self.ray is None:
            from guardrail.video.prefetch import prefetch

            engine = self.spec.build()
            track = self.on_group or (lambda n: None)
            # decoded and prepared (processor, rope index, layouts) ahead of the engine
            self.feed = prefetch(self.groups, lambda g: decode_group(engine.config, g,
                                                                     engine.prepare_or_none),
                                 ahead=self.ahead)
            return (o for group, ready in self.feed
                    for o in judge_decoded(engine, group, ready, track(len(group))))
        self.pool = _RayPool(self.spec, self.ray)
        return self.pool.map(self.groups)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()


class _Worker:
    """A Ray actor holding one engine."""

    def __init__(self, spec: EngineSpec):
        self.engine = spec.build()

    def ready(self) -> bool:
        return True

    def judge(self, group: list[Item]) -> list[Outcome]:
        return judge_group(self.engine, group)


class _RayPool:
    """Actors, each with one engine; at most `IN_FLIGHT` groups of videos queued per actor."""

    IN_FLIGHT = 2

    def __init__(self, spec: EngineSpec, options: RayOptions):
        import ray

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
        actor = ray.remote(num_cpus=options.num_cpus, num_gpus=options.num_gpus)(_Worker)
        self.actors = [actor.remote(spec) for _ in range(max(1, options.workers))]
        ray.get([a.ready.remote() for a in self.actors])

    def map(self, groups: list[list[Item]]) -> Iterator[Outcome]:
        queue, pending = iter(groups), {}

        def submit(actor) -> None:
            group = next(queue, None)
            if group is not None:
                pending[actor.judge.remote(group)] = actor

        for actor in self.actors:
            for _ in range(self.IN_FLIGHT):
                submit(actor)
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            submit(actor)
            yield from self.ray.get(ready[0])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


# ----------------------------------------------------------------------------- run.json

def read_run(out: Path) -> dict:
    """The run record beside a predictions file ({} when there is none)."""
    try:
        data = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == RUN_FORMAT else {}


def _check_settings(out: Path, dataset: Dataset, spec: EngineSpec) -> None:
    settings = json.loads(json.dumps(spec.settings()))
    record = read_run(out)
    if record:
        old = record.get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise UsageError(f"{out} holds a run with other settings ({', '.join(diff)}); "
                             "resume with the same settings or use another --out")
        return
    record = {"format": RUN_FORMAT, "dataset": str(dataset.root), "layout_kind": dataset.kind,
              "settings": settings, "sessions": []}
    (out / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _record_session(out: Path, judged: int, failed: int, skipped: int, elapsed: float,
                    ray: RayOptions | None) -> None:
    record = read_run(out)
    record.setdefault("sessions", []).append({
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "judged": judged,
        "failed": failed, "skipped": skipped, "elapsed_s": elapsed,
        "ray_workers": ray.workers if ray else 0})
    (out / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
