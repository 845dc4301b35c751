"""Pipeline-parallel benchmark: one GPT trained at several layouts (PP 1, 2, 4, interleaved PP 2 x V 2, and
PP 2 x DP 2 with and without the distributed optimizer) at the same global batch, each layout as real
processes (spawned, gloo, one thread each), in one run.

Per layout it reports:

* **step ms**: the median over the timed steps of one ``Trainer.train_step`` (forward, backward, gradient
  reductions, AdamW), the slowest rank's time, the ranks started together by a barrier. The layouts run in
  turns, ``--rounds`` times, each launch timing ``--steps`` steps after a warm-up step, so that a change in the
  machine's load falls on every layout;
* **bubble measured**: the mean over ranks of ``wait_s / total_s`` of ``pipeline.forward_backward``'s
  ``timings`` (time blocked waiting for a neighbour's activations or gradients over the schedule's time),
  next to the schedule's **bubble theory** ``(P - 1) / (V m + P - 1)`` for ``m`` micro-batches per pipeline;
* **activation peak** per rank: the most bytes of tensors autograd saved for backward alive at once
  (:class:`SavedTensorMeter` says exactly what is counted);
* **optimizer state** per rank: the fp32 master weights held apart from the model plus AdamW's ``exp_avg``
  and ``exp_avg_sq`` (:func:`optimizer_state_bytes`).

    python -m megacore.benchmarks pipeline [--layouts pp1 pp2 pp4 pp2v2 pp2dp2 pp2dp2+distopt] [--quick]
                                           [--rounds 2] [--steps 4] [--json PATH]
    megacore bench pipeline ...          (the same)
    python benchmarks/pipeline.py ...    (the same)

A layout is ``pp<P>[v<V>][dp<D>][+distopt]``: P pipeline stages, V virtual chunks per stage (interleaved
1F1B), D data-parallel replicas, ``+distopt`` the distributed optimizer (ZeRO-1; needs D > 1). The global
batch is the same for every layout: each data-parallel replica runs ``m / D`` of its ``m`` micro-batches.
More processes than cores time-slice: their waits then include time spent descheduled, so the header gives
the process and core counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Iterable, Optional

import torch

from megacore.benchmarks.ops import DTYPES, available_cores, describe_machine

_NAME = "megacore.benchmarks.pipeline"
DEFAULT_LAYOUTS = ["pp1", "pp2", "pp4", "pp2v2", "pp2dp2", "pp2dp2+distopt"]
# A GPT whose step takes about a second on one CPU core, with 8 layers (4 stages x 2 chunks). The vocabulary is
# small enough that the LM head (on the last stage) costs about one layer: a bigger head would make the last stage
# the slowest, and its neighbours' waits would measure that imbalance rather than the schedule's bubble.
CONFIG = dict(vocab_size=2048, hidden_size=128, num_layers=8, num_attention_heads=4, max_position_embeddings=128,
              hidden_dropout=0.0, attention_dropout=0.0)
QUICK_CONFIG = dict(CONFIG, vocab_size=512, hidden_size=32, max_position_embeddings=16)
MIB = 2**20


# ---- layouts -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One parallel layout (tensor-parallel size 1): ``pipeline`` stages x ``data`` replicas processes."""

    pipeline: int
    virtual: int = 1
    data: int = 1
    distributed_optimizer: bool = False

    @property
    def name(self) -> str:
        return (f"pp{self.pipeline}" + (f"v{self.virtual}" if self.virtual > 1 else "")
                + (f"dp{self.data}" if self.data > 1 else "") + ("+distopt" if self.distributed_optimizer else ""))

    @property
    def processes(self) -> int:
        return self.pipeline * self.data

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """``pp<P>[v<V>][dp<D>][+distopt]`` -> Layout. Raises ValueError for anything else."""
        match = re.fullmatch(r"pp(\d+)(?:v(\d+))?(?:dp(\d+))?(\+distopt)?", text)
        if not match:
            raise ValueError(f"{_NAME}: layout {text!r}: expected pp<P>[v<V>][dp<D>][+distopt], e.g. pp2v2 or "
                             "pp2dp2+distopt")
        p, v, d = (int(g) if g else 1 for g in match.groups()[:3])
        layout = cls(p, v, d, bool(match.group(4)))
        if min(p, v, d) < 1:
            raise ValueError(f"{_NAME}: layout {text!r}: sizes must be >= 1")
        if v > 1 and p == 1:
            raise ValueError(f"{_NAME}: layout {text!r}: virtual chunks (v{v}) need more than one pipeline stage")
        if layout.distributed_optimizer and d == 1:
            raise ValueError(f"{_NAME}: layout {text!r}: the distributed optimizer shards over data-parallel "
                             "replicas: give dp<D> with D > 1")
        return layout


def check_layout(layout: Layout, num_layers: int, microbatches: int) -> None:
    """ValueError when ``layout`` cannot run the benchmark's model and global batch."""
    from megacore.parallel.pipeline import check_schedule, stage_layers

    if microbatches % layout.data:
        raise ValueError(f"{_NAME}: {layout.name}: {microbatches} micro-batches do not split over {layout.data} "
                         "data-parallel replicas")
    stage_layers(num_layers, layout.pipeline, layout.virtual)
    check_schedule(microbatches // layout.data, layout.pipeline, layout.virtual)


def distributed_optimizer_class():
    """``megacore.training.DistributedOptimizer``, or None when this build does not have it."""
    try:
        from megacore.training.distributed_optimizer import DistributedOptimizer
    except ImportError:
        return None
    return DistributedOptimizer


# ---- what is measured ---------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


class _Saved:
    """What the pack hook returns: the saved tensor, and a release of its storage's count when autograd drops it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter", key: tuple):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Activation memory as autograd holds it: bytes of tensors saved for backward, live and at peak.

    Use ``with meter:`` around forward and backward (it installs ``torch.autograd.graph.saved_tensors_hooks``).

    Counted: every distinct storage under a tensor that autograd saves for backward (a pack hook sees it):
    layer inputs and the tensors the fused ops keep (norm statistics, the cross-entropy's logits and
    logsumexp, ...), activations received from the previous stage, token ids and labels. A storage is counted
    once, with its full ``untyped_storage().nbytes()`` (a view keeps all of it alive), from the first pack of a
    tensor on it until autograd has released every saved tensor on it (after the node's backward). Not
    counted: storages of ``exclude`` (the model's parameters, saved by the GEMMs but not activations);
    temporaries that live only inside one op; the stage output the schedule keeps to start the backward
    from (one ``[s, b, h]`` per micro-batch in flight) unless an op saved it too; gradients.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {_storage_key(t) for t in exclude}
        self.live: dict[tuple, list[int]] = {}  # storage -> [bytes, saved tensors on it]
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key in self.excluded:
            return t
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: tuple) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, model_params: Iterable[torch.Tensor]) -> dict:
    """Bytes of optimizer state this rank holds: ``masters`` (the tensors the optimizer steps on, unless they
    share storage with the model's parameters: an fp32 model's weights are its own masters), ``exp_avg`` and
    ``exp_avg_sq`` (AdamW's moments), each distinct storage once, and their ``total``."""
    model_storages = {_storage_key(p) for p in model_params}
    seen: set = set()
    out = {"masters": 0, "exp_avg": 0, "exp_avg_sq": 0}

    def add(kind: str, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in seen and key not in model_storages:
            seen.add(key)
            out[kind] += t.untyped_storage().nbytes()

    for group in optimizer.param_groups:
        for p in group["params"]:
            add("masters", p)
            state = optimizer.state.get(p, {})
            for kind in ("exp_avg", "exp_avg_sq"):
                if kind in state:
                    add(kind, state[kind])
    out["total"] = sum(out.values())
    return out


# ---- one rank ------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    config: dict
    dtype: str
    micro_batch: int
    seq: int
    microbatches: int  # per step, over all data-parallel replicas
    warmup: int
    steps: int


def _micro_batches(settings: Settings, step: int) -> list[dict]:
    g = torch.Generator().manual_seed(1000 + step)
    vocab, shape = settings.config["vocab_size"], (settings.micro_batch, settings.seq)
    out = []
    for _ in range(settings.microbatches):
        ids = torch.randint(0, vocab, shape, generator=g)
        out.append({"input_ids": ids, "labels": torch.randint(0, vocab, shape, generator=g)})
    return out


def measure_rank(rank: int, layout: Layout, settings: Settings) -> dict:
    """Builds this rank's part of the model at ``layout``, trains ``warmup + steps`` steps and returns what it
    measured (torch.distributed's default group initialized, one process per rank)."""
    import torch.distributed as dist

    from megacore.models import GPTModel, ModelConfig
    from megacore.parallel import DistributedDataParallel, initialize_model_parallel, pipeline
    from megacore.parallel.collectives import all_reduce
    from megacore.training import MixedPrecision, Trainer, build_optimizer

    state = initialize_model_parallel(1, layout.pipeline)
    torch.manual_seed(0)  # every rank builds the whole model from the same seed, then keeps its part
    model = GPTModel(ModelConfig(**settings.config))
    if layout.pipeline > 1:
        model = pipeline.cut_stage(model, virtual_size=layout.virtual)
    precision = MixedPrecision(model, DTYPES[settings.dtype])
    ddp = None
    if layout.data > 1:
        kwargs = {"reduce_scatter": True} if layout.distributed_optimizer else {}
        ddp = DistributedDataParallel(model, grad_dtype=torch.float32, **kwargs)
    if layout.distributed_optimizer:
        optimizer = precision = distributed_optimizer_class()(ddp, precision, lr=1e-4)
    else:
        optimizer = build_optimizer(precision, lr=1e-4)
    per_replica = settings.microbatches // layout.data
    timings: dict = {}
    trainer = Trainer(ddp or model, optimizer, None, precision=precision, ddp=ddp, clip=1.0,
                      grad_accumulation=per_replica, pipeline_timings=timings)
    meter = SavedTensorMeter(exclude=list(model.parameters()))

    step_s, cpu_s, losses = [], [], []
    for step in range(settings.warmup + settings.steps):
        batches = _micro_batches(settings, step)
        mine = batches[state.data_parallel_rank * per_replica:(state.data_parallel_rank + 1) * per_replica]
        if step == settings.warmup:  # the timed steps start: forget the warm-up's waits and peak
            timings.clear()
            meter.reset_peak()
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        with meter:
            metrics = trainer.train_step(mine)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)  # every thread of this process
        slowest, cpu_all = all_reduce(elapsed, None, "max"), all_reduce(cpu, None, "sum")
        if step >= settings.warmup:
            step_s.append(float(slowest))
            cpu_s.append(float(cpu_all))
        losses.append(metrics["loss"])
    if hasattr(optimizer, "wait_for_params"):
        optimizer.wait_for_params()
    return {
        "rank": rank, "pipeline_rank": state.pipeline_parallel_rank, "data_parallel_rank": state.data_parallel_rank,
        "step_s": step_s, "cpu_s": cpu_s, "wait_s": timings.get("wait_s", 0.0), "total_s": timings.get("total_s", 0.0),
        "activation_peak_bytes": meter.peak,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "optimizer_bytes": optimizer_state_bytes(optimizer, model.parameters()),
        "losses": losses,
    }


def _worker(rank: int, world: int, port: int, layout: Layout, settings: Settings, results, timeout_s: float):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    torch.set_num_threads(1)
    ok = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        results.put(("ok", rank, measure_rank(rank, layout, settings)))
        ok = True
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put(("error", rank, traceback.format_exc()))
    try:
        from megacore.parallel import state

        state.shutdown_distributed(barrier=ok)  # (after a failure the parent stops every rank: no barrier)
    except BaseException:  # noqa: BLE001 - reported next to the result, which already went back
        results.put(("teardown", rank, traceback.format_exc()))
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: Layout, settings: Settings, timeout_s: float = 600.0) -> list[dict]:
    """Spawns ``layout.processes`` processes (gloo, one thread each), runs :func:`measure_rank` in each and
    returns their results in rank order. Raises RuntimeError with the failing rank's traceback, or when the
    processes have not finished after ``timeout_s``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    world, port = layout.processes, _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, layout, settings, results, timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}  # rank -> its result
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world:
            if not results.empty():
                status, rank, payload = results.get()
                if status == "error":
                    raise RuntimeError(f"{_NAME}: {layout.name}: rank {rank} of {world} failed:\n{payload}")
                got[rank] = payload
            elif time.monotonic() > deadline:
                raise RuntimeError(f"{_NAME}: {layout.name}: ranks {sorted(set(range(world)) - set(got))} gave no "
                                   f"result within {timeout_s:.0f} s")
            elif not any(p.is_alive() for p in procs) and results.empty():
                raise RuntimeError(f"{_NAME}: {layout.name}: every process exited, ranks "
                                   f"{sorted(set(range(world)) - set(got))} without a result (exit codes "
                                   f"{[p.exitcode for p in procs]})")
            else:
                time.sleep(0.05)
    finally:
        for p in procs:
            p.join(60.0)  # tearing down waits for every rank (a barrier); a loaded machine is slow at it
            if p.is_alive():
                p.kill()
                p.join()
    teardown: dict[int, str] = {}  # rank -> the traceback of a failure after its result came back
    while not results.empty():
        status, rank, payload = results.get()
        if status == "teardown":
            teardown[rank] = payload
    for r, p in enumerate(procs):  # a crash while tearing down, after the result came back: say so, keep the result
        got[r]["exit_code"] = p.exitcode
        got[r]["teardown_error"] = teardown.get(r)
        if p.exitcode != 0:
            print(f"{_NAME}: warning: {layout.name}: rank {r} exited with code {p.exitcode} after reporting its "
                  f"result{(':' + chr(10) + teardown[r]) if r in teardown else ''}", file=sys.stderr, flush=True)
    return [got[r] for r in range(world)]


# ---- the report ------------------------------------------------------------------------------------------------------


def summarize(layout: Layout, settings: Settings, rounds: list[list[dict]]) -> dict:
    """One table row's numbers from the ranks' results of each round (``rounds[i][rank]``): step times pooled,
    each rank's waits summed over the rounds; memory from the last round (every round measures the same)."""
    from megacore.parallel.pipeline import bubble_fraction

    per_pipeline = settings.microbatches // layout.data
    ranks = rounds[-1]
    step_s = [s for results in rounds for s in results[0]["step_s"]]  # the slowest rank's, the same on every rank
    cpu_s = [s for results in rounds for s in results[0]["cpu_s"]]  # summed over the ranks
    bubbles = []
    for rank in range(layout.processes):
        wait, total = (sum(results[rank][k] for results in rounds) for k in ("wait_s", "total_s"))
        bubbles.append(wait / total if total else 0.0)
    return {
        "layout": layout.name, **asdict(layout), "processes": layout.processes,
        "microbatches_per_pipeline": per_pipeline,
        "step_ms": 1e3 * statistics.median(step_s),
        "step_ms_all": [1e3 * s for s in step_s],
        "cpu_ms": 1e3 * statistics.median(cpu_s),
        "cpu_ms_all": [1e3 * s for s in cpu_s],
        "bubble_measured": statistics.fmean(bubbles),
        "bubble_measured_per_rank": bubbles,
        "bubble_theory": bubble_fraction(per_pipeline, layout.pipeline, layout.virtual),
        "activation_peak_bytes": [r["activation_peak_bytes"] for r in ranks],
        "optimizer_bytes": [r["optimizer_bytes"]["total"] for r in ranks],
        "optimizer_bytes_detail": [r["optimizer_bytes"] for r in ranks],
        "parameter_bytes": [r["parameter_bytes"] for r in ranks],
        "final_loss": ranks[0]["losses"][-1],
        "rounds": rounds,  # [round][rank]: what each rank measured
    }


HEADER = ("| layout | processes / cores | micro-batches per pipeline | step ms | vs pp1 | CPU ms per step | "
          "bubble measured | bubble theory | activation peak MiB per rank | optimizer state MiB per rank | "
          "final loss |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _mib(values: list[int]) -> str:
    return " / ".join(f"{v / MIB:.2f}" for v in values)


def format_row(row: dict, cores: int, baseline_ms: Optional[float]) -> str:
    vs = f"{baseline_ms / row['step_ms']:.2f}x" if baseline_ms else "-"
    return (f"| {row['layout']} | {row['processes']} / {cores} | {row['microbatches_per_pipeline']} | "
            f"{row['step_ms']:.0f} | {vs} | {row['cpu_ms']:.0f} | {row['bubble_measured']:.3f} | "
            f"{row['bubble_theory']:.3f} | "
            f"{_mib(row['activation_peak_bytes'])} | {_mib(row['optimizer_bytes'])} | {row['final_loss']:.4f} |")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megacore bench pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, metavar="LAYOUT",
                        help="pp<P>[v<V>][dp<D>][+distopt] (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and batch, for a smoke run")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                        help="the model's dtype (bf16/fp16: fp32 master weights in the optimizer)")
    parser.add_argument("--microbatches", type=int, default=None,
                        help="micro-batches per step over all replicas (default 8; --quick 4)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; --quick 16)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per round, after one warm-up (default 4; --quick 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over the layouts, each launching them afresh in turn, so that a change in the "
                             "machine's load falls on every layout (default 2; --quick 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a layout may take")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    config = QUICK_CONFIG if args.quick else CONFIG
    microbatches = args.microbatches or (4 if args.quick else 8)
    settings = Settings(config=config, dtype=args.dtype, micro_batch=args.micro_batch,
                        seq=args.seq or (16 if args.quick else 128), microbatches=microbatches, warmup=1,
                        steps=args.steps or (1 if args.quick else 4))
    rounds = args.rounds or (1 if args.quick else 2)
    if min(settings.steps, rounds, settings.microbatches, settings.micro_batch, settings.seq) < 1:
        parser.error("--steps, --rounds, --microbatches, --micro-batch and --seq must be >= 1")
    if settings.seq > config["max_position_embeddings"]:
        parser.error(f"--seq {settings.seq} is longer than the model's {config['max_position_embeddings']} positions")
    try:
        layouts = [Layout.parse(text) for text in args.layouts]
        for layout in layouts:
            check_layout(layout, config["num_layers"], microbatches)
    except ValueError as e:
        parser.error(str(e))

    cores = available_cores()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each process runs with; describe_machine reports it
    machine = describe_machine()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    timed = rounds * settings.steps
    print(f"# megacore pipeline-parallel benchmark — GPT {config['num_layers']} layers x {config['hidden_size']} "
          f"hidden, vocab {config['vocab_size']}, {args.dtype} (fp32 masters + AdamW), global batch {microbatches} "
          f"micro-batches x {settings.micro_batch} x {settings.seq} tokens, step time the median of {timed} steps "
          f"({rounds} rounds x {settings.steps}, each after {settings.warmup} warm-up) — {machine} — one process "
          f"per rank, {cores} cores, load average {load:.1f} at start", flush=True)
    missing = "megacore.training.distributed_optimizer is not in this build"
    runnable = [lay for lay in layouts if not (lay.distributed_optimizer and distributed_optimizer_class() is None)]
    results: dict[Layout, list] = {layout: [] for layout in runnable}
    for _ in range(rounds):
        for layout in runnable:
            results[layout].append(run_layout(layout, settings, args.timeout))
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = {layout: summarize(layout, settings, got) for layout, got in results.items()}
    baseline = rows[Layout(1)]["step_ms"] if Layout(1) in rows else None
    skipped = [{"layout": layout.name, "skipped": missing} for layout in layouts if layout not in rows]
    print(HEADER)
    for layout in layouts:
        print(format_row(rows[layout], cores, baseline) if layout in rows
              else f"| {layout.name} | skipped: {missing} |")
    print(f"\nLoad average {end_load:.1f} at the end. step ms: median over the timed steps of the slowest rank's "
          "Trainer.train_step; vs pp1: pp1's step time over this layout's. CPU ms per step: the median of the CPU "
          "time (every thread) all ranks spent in a step, summed, which a busy machine inflates less. bubble "
          "measured: mean over ranks of the time blocked waiting for a neighbour's activations or gradients over "
          "the time of the schedule; bubble theory: (P-1)/(V m + P-1). activation peak: bytes of tensors saved for "
          "backward alive at once (parameters excluded). optimizer state: fp32 masters held apart from the model + "
          "AdamW exp_avg + exp_avg_sq. Per-rank lists are in rank order (rank = dp_rank + DP * pp_rank). With more "
          "processes than cores the processes time-slice, which inflates the measured waits and step times.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "cores": cores, "load_average": [load, end_load], "rounds": rounds,
                       "settings": asdict(settings), "rows": list(rows.values()), "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
