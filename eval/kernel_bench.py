"""`vlmeff bench --kernels`: the achieved memory bandwidth of vlmeff's token gather (`vlmeff.kernels.gather_tokens`),
Triton and torch, against the device's peak.

A gather moves bytes and does no arithmetic, so bandwidth is its measure: bytes = the gathered rows read + written
(2 B K D x element size) + the int64 index. Peak: the theoretical DRAM bandwidth when torch reports the memory clock
and bus width (2 transfers per clock), and always a measured one, a device-to-device copy of the same number of bytes
(what the memory system gives a trivial kernel). Times: CUDA events around `--runs` x REPEAT calls after a warm-up;
on the CPU perf_counter, torch backend only (Triton on the CPU runs in its interpreter, for tests, not for speed).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmeff.timing import Clock

# (B, N, D, K): LLaVA-1.5-7B hidden 4096 (576 tokens -> 64 / 192), a batch of 8, LLaVA-NeXT's 5 views (2880 tokens)
SHAPES = ((1, 576, 4096, 64), (1, 576, 4096, 192), (8, 576, 4096, 192), (8, 2880, 4096, 640), (16, 616, 896, 104))
QUICK_SHAPES = ((1, 64, 64, 16), (4, 128, 64, 32))  # `--quick`: a smoke test of the path
REPEAT = 20


def _time(fn, clock: Clock, runs: int) -> float:
    """Median seconds per call over `runs` timed batches of REPEAT calls, after one untimed batch."""
    for _ in range(REPEAT):
        fn()
    times = []
    for _ in range(runs):
        start = clock.now()
        for _ in range(REPEAT):
            fn()
        times.append(clock.seconds(start, clock.now()) / REPEAT)
    return sorted(times)[len(times) // 2]


def theoretical_bandwidth(device: torch.device) -> float | None:
    """Bytes/s from the memory clock (kHz) and bus width (bits) when torch reports them, else None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


def run_kernel_bench(device: torch.device, dtype: torch.dtype = torch.bfloat16, runs: int = 5,
                     shapes=SHAPES) -> dict[str, Any]:
    from vlmeff.kernels import gather_tokens, triton_available

    clock = Clock(device)
    backends = ["torch"]
    if device.type == "cuda" and triton_available():
        backends.insert(0, "triton")
    skipped = {} if "triton" in backends else {"triton": "needs a CUDA device and triton (on the CPU Triton only runs "
                                                          "in its interpreter, which tests use, not benchmarks)"}
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for batch, tokens, width, kept in shapes:
        x = torch.randn(batch, tokens, width, generator=gen).to(device=device, dtype=dtype)
        index = torch.stack([torch.randperm(tokens, generator=gen)[:kept].sort().values for _ in range(batch)])
        index = index.to(device)
        moved = 2 * batch * kept * width * x.element_size() + index.numel() * 8
        source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        copy_s = _time(lambda: target.copy_(source), clock, runs)  # noqa: B023 (called at once) reads and writes moved / 2 bytes
        for backend in backends:
            seconds = _time(lambda: gather_tokens(x, index, backend=backend), clock, runs)  # noqa: B023
            rows.append({"backend": backend, "shape": [batch, tokens, width, kept], "bytes": moved,
                         "us": seconds * 1e6, "gb_per_s": moved / seconds / 1e9,
                         "copy_gb_per_s": moved / copy_s / 1e9, "of_copy": copy_s / seconds})
    peak = theoretical_bandwidth(device)
    for row in rows:
        row["of_peak"] = None if peak is None else row["gb_per_s"] * 1e9 / peak
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "runs": runs, "repeat": REPEAT,
            "peak_gb_per_s": None if peak is None else peak / 1e9, "rows": rows, "skipped": skipped}


def kernel_table(results: dict[str, Any]) -> str:
    peak = results["peak_gb_per_s"]
    lines = [f"Token gather on {results['device']} ({results['dtype']}; median of {results['runs']} x {results['repeat']} "
             f"calls); theoretical peak: {'not reported by torch' if peak is None else f'{peak:.0f} GB/s'}.", "",
             "| backend | B x N x D -> K | MB moved | time us | GB/s | copy GB/s | of copy | of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        b, n, d, k = r["shape"]
        of_peak = "-" if r["of_peak"] is None else f"{r['of_peak']:.0%}"
        lines.append(f"| {r['backend']} | {b} x {n} x {d} -> {k} | {r['bytes'] / 1e6:.1f} | {r['us']:.1f} | "
                     f"{r['gb_per_s']:.1f} | {r['copy_gb_per_s']:.1f} | {r['of_copy']:.0%} | {of_peak} |")
    for backend, why in results["skipped"].items():
        lines.append(f"\n- {backend}: not measured: {why}.")
    return "\n".join(lines) + "\n"
