"""Generate videos from prompts on the command line.

    python -m opensora.sample --prompt "a red circle moving left on a black background"
    python -m opensora.sample --prompt-file prompts.txt --seeds 0 1 2 --output-dir runs/samples
    python -m opensora.sample --stage text --prompt-file prompts.txt -o runs/s   # stage 1 only
    python -m opensora.sample --stage latents -o runs/s                           # stage 2 from 1
    python -m opensora.sample --stage decode -o runs/s                            # stage 3 from 2

Each stage saves its result in the output folder (text_embeddings.npz, latents.npz, videos), so
the stages can run one at a time, e.g. on machines with different memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opensora.checkpoint import CheckpointError
from opensora.pipeline import Latents, TextEmbeddings, TextToVideoPipeline
from opensora.runtime import configure

STAGES = ("all", "text", "latents", "decode")


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, blank lines and # skipped)."""
    found = list(prompts)
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        found += [line.strip() for line in path.read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opensora.sample",
                                     description="Text to video with Open-Sora on MindSpore.")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompt-file")
    parser.add_argument("--seeds", type=int, nargs="*", help="one per prompt (default 0, 1, ...)")
    parser.add_argument("-o", "--output-dir", default="runs/samples")
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model-path", help="STDiT / STDiT2 weights (folder or file)")
    parser.add_argument("--vae-path")
    parser.add_argument("--t5-path")
    parser.add_argument("--tokenizer-path")
    parser.add_argument("--num-sampling-steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    parser.add_argument("--mode", choices=("pynative", "graph"), default="pynative",
                        help="graph compiles the denoiser once (faster from ~5 steps on)")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="sample from random transformer weights when none are found")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure()
    out = Path(args.output_dir)
    try:
        pipeline = TextToVideoPipeline.from_preset(
            args.preset, model_path=args.model_path, vae_path=args.vae_path,
            t5_path=args.t5_path, tokenizer_path=args.tokenizer_path,
            num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
            sampler=args.sampler, num_frames=args.num_frames,
            allow_untrained=args.allow_untrained, mode=args.mode)
        if args.stage in ("all", "text"):
            prompts = read_prompts(args.prompt, args.prompt_file)
            if not prompts:
                raise ValueError("no prompts: pass --prompt TEXT or --prompt-file FILE")
            embeddings = pipeline.encode_prompts(prompts)
            print("saved", embeddings.save(out / "text_embeddings.npz"))
        if args.stage in ("all", "latents"):
            if args.stage == "latents":
                embeddings = TextEmbeddings.load(out / "text_embeddings.npz")
            latents = pipeline.sample_latents(embeddings, args.seeds, progress=True)
            print("saved", latents.save(out / "latents.npz"))
        if args.stage in ("all", "decode"):
            if args.stage == "decode":
                latents = Latents.load(out / "latents.npz")
            for video in pipeline.decode(latents, out, args.format):
                print("saved", video.path)
    except (FileNotFoundError, ValueError, KeyError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
