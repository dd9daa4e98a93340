"""MFU and tokens/s of the training step for the 124m and 350m presets on one GPU, in bf16.

Runs the loop's own pieces (``TorchStrategy`` with bf16 autocast and fused AdamW, the next-token
objective) on random tokens, so the figure is what ``pretrain`` achieves per GPU before data and
Ray overheads. FLOPs per token follow ``models/flops.py`` (PaLM convention: 6N + attention).

    python benchmarks/gpu_mfu.py                       # both presets, peak looked up by GPU name
    python benchmarks/gpu_mfu.py --compile --peak-flops 989e12
"""

from __future__ import annotations

import argparse
import time

# Dense bf16 peak FLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_for(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def measure(preset: str, batch_size: int, args: argparse.Namespace, peak: float) -> dict[str, float]:
    import torch

    from models.flops import mfu, parameter_count, training_flops_per_token
    from models.presets import build_model
    from tasks.train.objectives import NextToken
    from tasks.train.settings import TrainConfig
    from tasks.train.strategies import TorchStrategy

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    cfg = TrainConfig(
        steps=args.warmup + args.steps, warmup_steps=args.warmup, batch_size=batch_size, precision="bf16", compile=args.compile
    )
    model = build_model(preset, args.vocab, max_position_embeddings=max(2048, args.seq_len))
    strategy = TorchStrategy(model, cfg, device)
    objective = NextToken()
    batch = {"input_ids": torch.randint(0, args.vocab, (batch_size, args.seq_len), device=device)}

    def step() -> None:
        with strategy.autocast():
            out = objective.compute(strategy.model, batch)
        strategy.backward(out.loss, sync=True)
        strategy.step()

    for _ in range(args.warmup):  # compilation, allocator and kernel autotuning
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * batch_size * args.seq_len / seconds
    flops_per_token = training_flops_per_token(model.config, args.seq_len)
    return {
        "params_m": parameter_count(model.config) / 1e6,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, flops_per_token, peak, 1),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["124m", "350m"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 8], help="micro-batch per preset")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s of the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    if len(args.batch_sizes) != len(args.presets):
        raise SystemExit("give one --batch-sizes entry per preset")
    name = torch.cuda.get_device_name()
    peak = args.peak_flops or peak_for(name)
    if peak is None:
        raise SystemExit(f"unknown peak FLOP/s for '{name}': pass --peak-flops")

    print(f"{name}, peak {peak / 1e12:.0f} TFLOP/s bf16, seq_len {args.seq_len}, compile={args.compile}")
    print(f"{'preset':>7} {'params':>9} {'batch':>6} {'tokens/s':>12} {'MFU':>7} {'peak mem':>9}")
    for preset, batch_size in zip(args.presets, args.batch_sizes):
        r = measure(preset, batch_size, args, peak)
        print(f"{preset:>7} {r['params_m']:8.1f}M {batch_size:6d} {r['tokens_per_s']:12.0f} "
              f"{r['mfu']:7.1%} {r['peak_mem_gb']:7.1f}GB")


if __name__ == "__main__":
    main()
