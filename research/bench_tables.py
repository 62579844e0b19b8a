"""The benchmark's records as Markdown (`research.bench`): one row per
framework, batch, device count and run, and the medians over runs. Pure
functions of the records, importable without the benchmark's flags."""
import statistics


def render(records: list[dict], streamed: list[dict], unit: str, about: dict,
           bf16: bool = False) -> list[str]:
    """The results as Markdown tables: one row per framework, batch and
    device count, JAX's train and eval ratios to PyTorch's eager step."""
    peak = about["matmul_peak_flops"]
    lines = [(f"Machine: {about['machine']}; ISA: {about['cpu_flags']}; matmul "
              f"peak for MFU {peak / 1e9:.0f} GFLOP/s"
              + (" (bfloat16: 2x the float32 matmul)" if bf16 else "") + "."), "",
             (f"| config | batch | framework | devices | train {unit} | eval {unit} "
              "| step ms | MFU | train JAX : PyTorch | eval JAX : PyTorch |"),
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rec in records:
        ratios = ["", ""]
        if rec["framework"] == "jax":
            torch_rec = _twin(records, rec)
            if torch_rec:
                ratios = [f"{rec[k] / torch_rec[k]:.2f}"
                          for k in ("train_per_sec", "eval_per_sec")]
        lines.append(
            f"| {rec['config']}{_run_label(rec)} | {rec['batch_size']} | {rec['framework']} | "
            f"{rec.get('devices', 1)} | {rec['train_per_sec']:,.0f} | "
            f"{rec['eval_per_sec']:,.0f} | {rec['step_ms']:.2f} | {rec['mfu']:.1%} | "
            + " | ".join(ratios) + " |")
    if streamed:
        lines += ["", (f"Streaming input ({unit}; step ms with its streamed batch, "
                       "the time it waited for it, without it, the reader alone, "
                       "and the in-memory step, all timed in one alternating "
                       "loop):"), "",
                  ("| config | batch | devices | train | step ms | waited | "
                   "no input | reader | in memory |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for rec in streamed:
            lines.append(
                f"| {rec['config']}{_run_label(rec)} | {rec['batch_size']} | {rec['devices']} | "
                f"{rec['train_per_sec']:,.0f} | {rec['step_ms']:.2f} | "
                f"{rec['wait_ms']:.2f} | {rec['step_ms_without_input']:.2f} | "
                f"{rec['reader_per_sec']:,.0f} | {rec['step_ms_in_memory']:.2f} |")
    return lines


def _twin(records: list[dict], rec: dict) -> dict | None:
    """The PyTorch eager record of `rec`'s config, batch and run."""
    return next((r for r in records if r["framework"] == "torch"
                 and r["config"] == rec["config"] and r["batch_size"] == rec["batch_size"]
                 and r.get("run", 0) == rec.get("run", 0)), None)


def _run_label(rec: dict) -> str:
    return f" (run {rec['run'] + 1})" if "run" in rec else ""


def medians(records: list[dict], unit: str) -> list[str]:
    """Markdown: per config, batch and device count, the median over the runs
    of JAX's and PyTorch's throughputs and of each run's JAX : PyTorch ratio
    (the ratios listed), and JAX's median MFU."""
    med = statistics.median
    runs = 1 + max(r.get("run", 0) for r in records)
    lines = [f"Medians over {runs} runs (in brackets: each run's ratio):", "",
             (f"| config | batch | devices | JAX train {unit} | PyTorch train | "
              f"train JAX : PyTorch | JAX eval {unit} | PyTorch eval | "
              "eval JAX : PyTorch | JAX MFU |"),
             "|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        if rec["framework"] == "jax":
            groups.setdefault((rec["config"], rec["batch_size"], rec["devices"]),
                              []).append(rec)
    for (name, batch, devices), mine in groups.items():
        twins = [_twin(records, rec) for rec in mine]
        cells = []
        for key in ("train_per_sec", "eval_per_sec"):
            cells.append(f"{med(r[key] for r in mine):,.0f}")
            if all(twins):
                ratios = [r[key] / t[key] for r, t in zip(mine, twins)]
                cells += [f"{med(t[key] for t in twins):,.0f}",
                          f"**{med(ratios):.2f}** ("
                          + ", ".join(f"{x:.2f}" for x in ratios) + ")"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {name} | {batch} | {devices} | " + " | ".join(cells)
                     + f" | {med(r['mfu'] for r in mine):.1%} |")
    return lines
