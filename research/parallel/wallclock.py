"""A wall-clock model of data-parallel communication: what an all-reduce of
the model costs on a given network, and the time per step of synchronous
training against DiLoCo's every-H-steps sync (blocking or delayed).

python -m research.parallel.wallclock --compute_ms=40 --mbytes=0.25 \
    [--output=wallclock.json]
"""
from absl import app
from absl import flags

from research import provenance


def allreduce_seconds(num_bytes: float, participants: int, gbit_per_s: float,
                      latency_s: float) -> float:
    """A ring all-reduce of `num_bytes` over `participants` links of
    `gbit_per_s` each: 2 (n - 1) steps, each moving num_bytes / n and paying
    the latency once (the bandwidth-optimal textbook model)."""
    if participants <= 1:
        return 0.0
    n = participants
    return 2 * (n - 1) * (latency_s + num_bytes / n / (gbit_per_s * 1e9 / 8))


def modeled_step_seconds(compute_s: float, num_bytes: float, participants: int,
                         gbit_per_s: float, latency_s: float, sync_every: int = 1,
                         delayed: bool = False) -> float:
    """Wall-clock time per step: compute, plus the all-reduce of every
    `sync_every`-th step (sync: every step) blocking, or, `delayed`, only the
    part of it that a period of compute does not hide."""
    comm = allreduce_seconds(num_bytes, participants, gbit_per_s, latency_s)
    if delayed:
        return compute_s + max(0.0, comm - sync_every * compute_s) / sync_every
    return compute_s + comm / sync_every


def wall_clock_table(compute_s: float, num_bytes: float, *, latency_s: float,
                     replicas=(4, 16, 64, 256, 1024), links=(1, 10, 100),
                     sync_every=(16, 64)) -> str:
    """Markdown: modeled seconds per step of `sync` (an all-reduce of
    `num_bytes` every step) and of DiLoCo (every H steps, blocking or
    delayed), for K participants on links of `links` Gbit/s."""
    schemes = [("sync", 1, False)] + [
        (f"H={h}{' delayed' if d else ''}", h, d)
        for h in sync_every for d in (False, True)]
    lines = ["| K | link | " + " | ".join(n for n, _, _ in schemes) + " |",
             "|---" * (2 + len(schemes)) + "|"]
    for k in replicas:
        for gbit in links:
            cells = [modeled_step_seconds(compute_s, num_bytes, k, gbit, latency_s,
                                          h, d) for _, h, d in schemes]
            lines.append(f"| {k} | {gbit} Gbit/s | " + " | ".join(
                f"{1e3 * c:.1f} ms ({c / compute_s:.2f}x)" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    table = wall_clock_table(FLAGS.compute_ms / 1e3, FLAGS.mbytes * 1e6,
                             latency_s=FLAGS.latency_us * 1e-6)
    print(table)
    if FLAGS.output:  # the modelled table, with how it was made
        provenance.write(FLAGS.output, provenance.about(), {
            "compute_ms": FLAGS.compute_ms, "mbytes": FLAGS.mbytes,
            "latency_us": FLAGS.latency_us, "table": table}, table.splitlines())


if __name__ == "__main__":
    flags.DEFINE_float("compute_ms", None, "Compute time of one step (per replica).",
                       required=True)
    flags.DEFINE_float("mbytes", None, "Megabytes all-reduced per sync (the "
                       "parameters).", required=True)
    flags.DEFINE_float("latency_us", 50.0, "Latency of one all-reduce step.")
    flags.DEFINE_string("output", "", "Also write the table to this JSON file "
                        "(and its .md twin).")
    FLAGS = flags.FLAGS
    app.run(main)
