"""Control for stage (a): Open-Sora v1.1.0's own PyTorch STDiT2 and IDDPM on stage (a)'s data.

Trains the original STDiT2 (the tiny preset's shape) with the original IDDPM `training_losses`
on the latents and caption features that `stage_a_one_shape.py` cached, with stage (a)'s recipe,
then samples the four captions over four seeds with the EMA weights and the original guided
IDDPM sampler. The sampled latents go back to the MindSpore side, which decodes and scores them
(`stage_a_one_shape.py --score-control`): if the control moves the captioned way and our port
does not, the port is at fault; if neither does, the recipe is.

Runs in its own PyTorch venv (no MindSpore here) on Open-Sora's source at tag v1.1.0, extracted
outside this repo (nothing of it is copied here):

    python3 -m venv /work/torch-venv
    /work/torch-venv/bin/pip install -r research/control_pytorch_requirements.txt
    mkdir -p /work/torch-control/Open-Sora
    git --git-dir=OPEN_SORA_CLONE/.git archive v1.1.0 opensora LICENSE \\
        | tar -x -C /work/torch-control/Open-Sora
    echo d599fd75b32317121aa3acdd220dd955ef9095b0 > /work/torch-control/Open-Sora/COMMIT
    nice -n 19 /work/torch-venv/bin/python research/control_pytorch.py  # 200 steps of 64 clips

Only the model, its layers, the IDDPM package and `utils/train_utils.py` (MaskGenerator,
update_ema) are imported, as the files are; their packages' `__init__`s (which import every
model, mmengine, colossalai) are not run. Stand-ins, all outside the original files:
- `opensora.registry` (mmengine): registration decorators that return the class unchanged;
- `opensora.utils.ckpt_utils` (colossalai): `load_checkpoint`, never called here;
- `colossalai.utils.get_current_device`: the CPU (respace puts its timestep map there);
- `xformers.ops.memory_efficient_attention` with `fmha.BlockDiagonalMask.from_seqlens`, when
  xformers is not installed: exact softmax attention through torch's
  `scaled_dot_product_attention`, each sample's queries on its own caption tokens;
- `timm.models.layers.DropPath` / `timm.models.vision_transformer.Mlp`: timm's own
  `timm/layers/drop.py` and `mlp.py`, loaded without `timm/__init__` (which needs torchvision,
  and PyPI's torchvision is a CUDA build that does not load beside the CPU torch; torchvision is
  hidden from transformers too, which imports it whenever it is installed);
- `CaptionEmbedder.token_drop` draws its drop mask with `torch.rand(B).cuda()`: wrapped to draw
  the same `torch.rand(B)` on the caption's device and pass it as `force_drop_ids`;
- `GaussianDiffusion.__init__` defaults to `device="cuda"` (IDDPM passes none): defaults to the CPU.
The original trains in bf16 under colossalai's ZeRO with HybridAdam; this runs float32 on the CPU
with torch's AdamW at HybridAdam's defaults (betas 0.9/0.999, eps 1e-8), as the MindSpore side.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import random
import sys
import time
import types
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "runs" / "research" / "stage_a"
OPEN_SORA = Path(os.environ.get("OPEN_SORA_V110", "/work/torch-control/Open-Sora"))
EXPECTED_COMMIT = "d599fd75b32317121aa3acdd220dd955ef9095b0"  # tag v1.1.0
# Open-Sora 1.1's training configs (configs/opensora-v1-1/train/stage*.py)
MASK_RATIOS = {
    "mask_no": 0.75,
    "mask_quarter_random": 0.025,
    "mask_quarter_head": 0.025,
    "mask_quarter_tail": 0.025,
    "mask_quarter_head_tail": 0.05,
    "mask_image_random": 0.025,
    "mask_image_head": 0.025,
    "mask_image_tail": 0.025,
    "mask_image_head_tail": 0.05,
}
DIRECTIONS = ("left", "right", "up", "down")
CAPTIONS = [f"a red circle moving {d} on a black background" for d in DIRECTIONS]


# --- stand-ins for what the original files import but this control cannot or need not load ---

class _Registry:
    """mmengine's Registry as far as the model files use it: `register_module` decorators."""

    def register_module(self, name: Any = None, force: bool = False, module: Any = None) -> Any:
        return module if module is not None else (lambda obj: obj)


class BlockDiagonalMask:
    """xformers.ops.fmha.BlockDiagonalMask: query block i attends key/value block i only."""

    def __init__(self, q_seqlen: list[int], kv_seqlen: list[int]) -> None:
        self.q_seqlen = [int(n) for n in q_seqlen]
        self.kv_seqlen = [int(n) for n in kv_seqlen]

    @classmethod
    def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int] | None = None
                     ) -> BlockDiagonalMask:
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

    def materialize(self, device: torch.device) -> torch.Tensor:
        """(Mq, Mk) bool, True where attention is allowed."""
        allowed = torch.zeros(sum(self.q_seqlen), sum(self.kv_seqlen), dtype=torch.bool,
                              device=device)
        q0 = k0 = 0
        for nq, nk in zip(self.q_seqlen, self.kv_seqlen):
            allowed[q0:q0 + nq, k0:k0 + nk] = True
            q0, k0 = q0 + nq, k0 + nk
        return allowed


def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attn_bias: BlockDiagonalMask | None = None, p: float = 0.0,
                               scale: float | None = None) -> torch.Tensor:
    """xformers' exact attention on (B, M, H, K) tensors (softmax scale 1/sqrt(K))."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, M, K)
    if attn_bias is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
        return out.transpose(1, 2)
    assert query.shape[0] == 1, "a BlockDiagonalMask packs the batch into one sequence"
    nq, nk = attn_bias.q_seqlen, attn_bias.kv_seqlen
    assert sum(nq) == query.shape[1] and sum(nk) == key.shape[1]
    heads, dim = query.shape[2], query.shape[3]
    if len(set(nq)) == 1:  # Open-Sora: every sample has N queries; pad its caption tokens
        b, n, longest = len(nq), nq[0], max(nk)
        qb = query[0].reshape(b, n, heads, dim).transpose(1, 2)
        kb, vb = (torch.nn.utils.rnn.pad_sequence(list(torch.split(t[0], nk)), batch_first=True)
                  .transpose(1, 2) for t in (key, value))  # (b, H, longest, K)
        lengths = torch.tensor(nk, device=query.device)
        allowed = (torch.arange(longest, device=query.device)[None] < lengths[:, None])
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed[:, None, None],
                                             dropout_p=p, scale=scale)
        return out.transpose(1, 2).reshape(1, b * n, heads, dim)
    allowed = attn_bias.materialize(query.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=scale)
    return out.transpose(1, 2)


def _no_checkpoint(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("the control trains from scratch; no checkpoint loading")


def _module(name: str, path: Path | None = None, **attrs: Any) -> types.ModuleType:
    """A module in sys.modules; with `path` a package whose submodules load from that folder
    without running its __init__."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
    if path is not None:
        module.__path__ = [str(path)]
        module.__spec__.submodule_search_locations = [str(path)]
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _timm_layers() -> None:
    """timm's Mlp and DropPath from their own files, under the names stdit2.py imports."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("timm is not installed in this venv")
    timm_dir = Path(list(spec.submodule_search_locations)[0])
    _module("timm", timm_dir)
    _module("timm.layers", timm_dir / "layers")
    mlp = importlib.import_module("timm.layers.mlp")
    drop = importlib.import_module("timm.layers.drop")
    _module("timm.models", timm_dir / "models")
    _module("timm.models.layers", DropPath=drop.DropPath, Mlp=mlp.Mlp)
    _module("timm.models.vision_transformer", Mlp=mlp.Mlp)


def load_open_sora(root: Path) -> dict[str, types.ModuleType]:
    """Import the original STDiT2, its layers, IDDPM and train_utils from `root/opensora`."""
    src = root / "opensora"
    if not (src / "models" / "stdit" / "stdit2.py").is_file():
        raise SystemExit(f"no Open-Sora v1.1.0 source under {root} (see this script's docstring;"
                         " or set OPEN_SORA_V110 / --open-sora)")
    for name in ("", ".models", ".models.layers", ".models.stdit", ".schedulers",
                 ".acceleration", ".utils"):
        _module("opensora" + name, src / name.lstrip(".").replace(".", "/"))
    _module("opensora.registry", MODELS=_Registry(), SCHEDULERS=_Registry(),
            DATASETS=_Registry())
    _module("opensora.utils.ckpt_utils", load_checkpoint=_no_checkpoint)
    _module("colossalai")
    _module("colossalai.utils", get_current_device=lambda: torch.device("cpu"))
    if importlib.util.find_spec("xformers") is None:
        fmha = _module("xformers.ops.fmha", BlockDiagonalMask=BlockDiagonalMask)
        ops = _module("xformers.ops", fmha=fmha,
                      memory_efficient_attention=memory_efficient_attention)
        _module("xformers", ops=ops)
    # PyPI's torchvision is a CUDA build that fails to load beside the CPU torch; nothing here
    # needs it, but transformers imports it when installed (timm's dependency): hide it
    sys.modules.setdefault("torchvision", None)
    importlib.import_module("transformers")  # before the timm stand-in, which it probes
    _timm_layers()
    modules = {name: importlib.import_module(f"opensora.{name}") for name in
               ("models.layers.blocks", "models.stdit.stdit2", "schedulers.iddpm",
                "utils.train_utils")}
    embedder = modules["models.layers.blocks"].CaptionEmbedder
    original_drop = embedder.token_drop

    def token_drop(self: Any, caption: torch.Tensor, force_drop_ids: Any = None) -> Any:
        if force_drop_ids is None:  # the original: torch.rand(B).cuda() < uncond_prob
            drops = torch.rand(caption.shape[0]).to(caption.device) < self.uncond_prob
            force_drop_ids = drops.long()
        return original_drop(self, caption, force_drop_ids)

    embedder.token_drop = token_drop
    diffusion = sys.modules["opensora.schedulers.iddpm.gaussian_diffusion"].GaussianDiffusion
    original_init = diffusion.__init__

    def init_on_cpu(self: Any, *, device: str = "cpu", **kwargs: Any) -> None:
        original_init(self, device=device, **kwargs)  # the original defaults to "cuda"

    diffusion.__init__ = init_on_cpu
    return modules


def open_sora_commit(root: Path) -> str:
    marker = root / "COMMIT"
    return marker.read_text().strip() if marker.is_file() else "unknown"


def source_digest(root: Path) -> str:
    """sha256 (16 hex) of the original files this control runs."""
    digest = hashlib.sha256()
    for rel in ("models/stdit/stdit2.py", "models/layers/blocks.py", "schedulers/iddpm/__init__.py",
                "schedulers/iddpm/gaussian_diffusion.py", "schedulers/iddpm/respace.py",
                "schedulers/iddpm/diffusion_utils.py", "utils/train_utils.py"):
        digest.update((root / "opensora" / rel).read_bytes())
    return digest.hexdigest()[:16]


# --- our side's settings, read without importing MindSpore ---

def tiny_preset(presets_py: Path) -> dict[str, Any]:
    """The keyword literals of `PRESETS["tiny"] = Preset(name="tiny", ...)`, `model` a dict."""
    for node in ast.walk(ast.parse(presets_py.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Preset"):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        name = keywords.get("name")
        if not (isinstance(name, ast.Constant) and name.value == "tiny"):
            continue
        preset = {}
        for key, value in keywords.items():
            if key == "model":
                preset[key] = {k.arg: ast.literal_eval(k.value) for k in value.keywords}
            else:
                try:
                    preset[key] = ast.literal_eval(value)
                except ValueError:
                    pass  # a path expression
        return preset
    raise SystemExit(f"no Preset(name='tiny', ...) in {presets_py}")


def cache_file(folder: Path, video: str, csv_dir: Path) -> Path:
    """opensora.data.cache_files.cache_path: the video's path under `folder`, suffix .npz."""
    relative = Path(video)
    if relative.is_absolute():
        if relative.is_relative_to(csv_dir.resolve()):
            relative = relative.relative_to(csv_dir.resolve())
        else:
            relative = Path(*relative.parts[1:])
    return folder / relative.with_suffix(".npz")


def read_stage_data(csv_path: Path, latent_dir: Path, t5_dir: Path) -> dict[str, Any]:
    """Every clip's cached posterior (mean, std) and caption features, stacked."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = [(r["video"], r["caption"]) for r in csv.DictReader(handle)]
    if not rows:
        raise SystemExit(f"{csv_path}: no rows")
    means, stds, ys, masks = [], [], [], []
    for video, _ in rows:
        with np.load(cache_file(latent_dir, video, csv_path.parent)) as data:
            means.append(data["latent_mean"].astype(np.float32))
            stds.append(data["latent_std"].astype(np.float32))
        with np.load(cache_file(t5_dir, video, csv_path.parent)) as data:
            ys.append(data["y"].astype(np.float32))
            masks.append(data["mask"].astype(np.int64))
    return dict(captions=[c for _, c in rows], mean=torch.from_numpy(np.stack(means)),
                std=torch.from_numpy(np.stack(stds)), y=torch.from_numpy(np.stack(ys)),
                mask=torch.from_numpy(np.stack(masks)))


def micro_conditions(batch: int, num_frames: int, height: int, width: int, fps: float,
                     ar: float) -> dict[str, torch.Tensor]:
    """STDiT2's size / length / fps conditions as the original passes them (float tensors)."""
    values = dict(num_frames=num_frames, height=height, width=width, ar=ar, fps=fps)
    return {k: torch.full((batch,), float(v)) for k, v in values.items()}


class CachedCaptions:
    """Stands in for Open-Sora's T5Encoder in `IDDPM.sample`: the cached caption features, and
    `null` exactly as T5Encoder.null (the model's y_embedder.y_embedding)."""

    def __init__(self, captions: list[str], y: torch.Tensor, mask: torch.Tensor,
                 y_embedder: Any) -> None:
        self.captions, self.y, self.mask, self.y_embedder = captions, y, mask, y_embedder

    def encode(self, text: list[str]) -> dict[str, torch.Tensor]:
        assert list(text) == self.captions
        return dict(y=self.y[:, None], mask=self.mask)

    def null(self, n: int) -> torch.Tensor:
        return self.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adam-eps", type=float, default=1e-8)  # HybridAdam's default
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-masks", action="store_true",
                        help="train without Open-Sora 1.1's MaskGenerator")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--open-sora", type=Path, default=OPEN_SORA,
                        help="extracted Open-Sora v1.1.0 tree (env OPEN_SORA_V110)")
    parser.add_argument("--stage-dir", type=Path, default=STAGE,
                        help="stage (a)'s run folder: inputs and outputs live here")
    parser.add_argument("--csv", type=Path, help="default STAGE/world/video_caption.csv")
    parser.add_argument("--latent-dir", type=Path, help="default STAGE/train/cache/latents")
    parser.add_argument("--t5-dir", type=Path, help="default STAGE/train/cache/t5")
    parser.add_argument("--caption-features", type=Path, help="default STAGE/captions.npz")
    parser.add_argument("--record", type=Path, default=ROOT / "research" / "control_pytorch.json")
    parser.add_argument("--presets", type=Path, default=ROOT / "opensora" / "presets.py")
    parser.add_argument("--vae-config", type=Path,
                        default=ROOT / "data_samples" / "models" / "vae_tiny" / "config.json")
    args = parser.parse_args(argv)
    stage = args.stage_dir
    args.csv = args.csv or stage / "world" / "video_caption.csv"
    args.latent_dir = args.latent_dir or stage / "train" / "cache" / "latents"
    args.t5_dir = args.t5_dir or stage / "train" / "cache" / "t5"
    args.caption_features = args.caption_features or stage / "captions.npz"
    return args


def train(args: argparse.Namespace, os_modules: dict[str, Any], preset: dict[str, Any],
          data: dict[str, Any], scaling_factor: float, vae_factor: int, loss_csv: Path
          ) -> tuple[Any, dict[str, Any]]:
    stdit2 = os_modules["models.stdit.stdit2"]
    train_utils = os_modules["utils.train_utils"]
    iddpm = os_modules["schedulers.iddpm"]
    config = stdit2.STDiT2Config(**preset["model"], enable_flash_attn=False,
                                 enable_layernorm_kernel=False)
    model = stdit2.STDiT2(config)
    ema = deepcopy(model).to(torch.float32)
    for p in ema.parameters():
        p.requires_grad_(False)
    scheduler = iddpm.IDDPM(timestep_respacing="")  # Open-Sora 1.1's training scheduler
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=args.adam_eps,
                                  weight_decay=0.0)
    model.train()
    train_utils.update_ema(ema, model, decay=0, sharded=False)
    ema.eval()
    mask_generator = None if args.no_masks else train_utils.MaskGenerator(MASK_RATIOS)

    clips, channels, frames_cached, h, w = data["mean"].shape
    num_frames = int(preset.get("num_frames", frames_cached))
    if frames_cached < num_frames:
        raise SystemExit(f"cached clips have {frames_cached} latent frames, fewer than "
                         f"num_frames={num_frames}")
    if clips < args.batch:
        raise SystemExit(f"{clips} clips cannot fill a batch of {args.batch} (drop_last)")
    height, width = h * vae_factor, w * vae_factor
    # VariableVideoTextDataset: ar = width / height; the clip's fps
    micro = micro_conditions(args.batch, num_frames, height, width, float(preset.get("fps", 8)),
                             width / height)
    rng = np.random.default_rng(args.seed)

    def batches() -> Any:  # shuffled epochs, drop_last
        while True:
            order = rng.permutation(clips)
            for start in range(0, clips - args.batch + 1, args.batch):
                yield order[start:start + args.batch]

    losses: list[float] = []
    loss_csv.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with open(loss_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "mse", "vb", "grad_norm", "seconds"])
        for step, index in zip(range(1, args.steps + 1), batches()):
            index = torch.from_numpy(index)
            offsets = rng.integers(0, frames_cached - num_frames + 1, size=args.batch)
            window = [slice(int(o), int(o) + num_frames) for o in offsets]
            mean = torch.stack([data["mean"][i][:, s] for i, s in zip(index.tolist(), window)])
            std = torch.stack([data["std"][i][:, s] for i, s in zip(index.tolist(), window)])
            x = (mean + std * torch.randn_like(std)) * scaling_factor  # posterior draw, scaled
            model_args: dict[str, Any] = dict(y=data["y"][index][:, None],
                                              mask=data["mask"][index], **micro)
            mask = None
            if mask_generator is not None:
                mask = mask_generator.get_masks(x)
                model_args["x_mask"] = mask
            t = torch.randint(0, scheduler.num_timesteps, (x.shape[0],))
            loss_dict = scheduler.training_losses(model, x, t, model_args, mask=mask)
            loss = loss_dict["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            train_utils.update_ema(ema, model, decay=args.ema_decay, sharded=False)
            losses.append(loss.item())
            seconds = time.perf_counter() - began
            writer.writerow([step, f"{loss.item():.6f}", f"{loss_dict['mse'].mean().item():.6f}",
                             f"{loss_dict['vb'].mean().item():.6f}", f"{grad_norm.item():.4f}",
                             f"{seconds:.2f}"])
            if step % args.log_every == 0 or step == args.steps:
                handle.flush()
                print(f"step {step}/{args.steps} loss {np.mean(losses[-args.log_every:]):.4f} "
                      f"({seconds / step:.2f} s/step)", flush=True)
    seconds = time.perf_counter() - began
    summary = dict(train_seconds=round(seconds, 1),
                   seconds_per_step=round(seconds / max(args.steps, 1), 3),
                   clips_per_second=round(args.steps * args.batch / max(seconds, 1e-9), 2),
                   final_loss_mean_last_50=round(float(np.mean(losses[-50:])), 5),
                   first_loss=round(losses[0], 5) if losses else None,
                   num_frames=num_frames, image_size=[height, width],
                   trainable_parameters=sum(p.numel() for p in params))
    return ema, summary


def sample(args: argparse.Namespace, os_modules: dict[str, Any], ema: Any, preset: dict[str, Any],
           latent_shape: tuple[int, int, int, int], image_size: tuple[int, int]
           ) -> tuple[np.ndarray, list[str], float]:
    with np.load(args.caption_features) as data:
        captions = [str(c) for c in data["captions"]]
        y = torch.from_numpy(data["y"].astype(np.float32))
        mask = torch.from_numpy(data["mask"].astype(np.int64))
    if y.ndim == 4:  # (B, 1, L, C)
        y = y[:, 0]
    if captions != CAPTIONS:
        print(f"note: sampling the captions of {args.caption_features}: {captions}")
    scheduler = os_modules["schedulers.iddpm"].IDDPM(num_sampling_steps=args.sample_steps,
                                                     cfg_scale=args.cfg_scale)
    encoder = CachedCaptions(captions, y, mask, ema.y_embedder)
    height, width = image_size
    n = len(captions)
    began = time.perf_counter()
    out = []
    ema.eval()
    with torch.no_grad():
        for seed in args.seeds:
            torch.manual_seed(seed)
            z = torch.randn(n, *latent_shape)
            # scripts/inference.py: ar = height / width; the configured fps
            extra = micro_conditions(n, latent_shape[1], height, width,
                                     float(preset.get("fps", 8)), height / width)
            samples = scheduler.sample(ema, encoder, z=z, prompts=captions,
                                       device=torch.device("cpu"), additional_args=extra)
            out.append(samples.float().numpy())
            print(f"sampled seed {seed} ({time.perf_counter() - began:.0f} s)", flush=True)
    return np.stack(out), captions, time.perf_counter() - began


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)  # MaskGenerator draws with `random`
    os_modules = load_open_sora(args.open_sora)
    commit = open_sora_commit(args.open_sora)
    if commit != EXPECTED_COMMIT:
        print(f"warning: Open-Sora source records commit {commit}, not v1.1.0's "
              f"{EXPECTED_COMMIT}")
    preset = tiny_preset(args.presets)
    vae_config = json.loads(args.vae_config.read_text())
    scaling_factor = float(vae_config["scaling_factor"])
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    data = read_stage_data(args.csv, args.latent_dir, args.t5_dir)
    print(f"{len(data['captions'])} clips, latents {tuple(data['mean'].shape[1:])}, "
          f"captions {tuple(data['y'].shape[1:])}, scaling factor {scaling_factor}", flush=True)
    loss_csv = args.stage_dir / "control_pytorch_loss.csv"
    ema, summary = train(args, os_modules, preset, data, scaling_factor, vae_factor, loss_csv)
    channels, _, h, w = data["mean"].shape[1:]
    latent_shape = (channels, summary["num_frames"], h, w)
    latents, captions, sample_seconds = sample(args, os_modules, ema, preset, latent_shape,
                                               tuple(summary["image_size"]))
    out = args.stage_dir / "control_pytorch_latents.npz"
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, latents=latents.astype(np.float32), captions=np.array(captions),
             seeds=np.array(args.seeds))
    tmp.replace(out)
    record = {
        "framework": f"PyTorch {torch.__version__} (CPU, float32, {args.threads} threads)",
        "torch": torch.__version__,
        "open_sora_commit": commit,
        "open_sora_source_sha256": source_digest(args.open_sora),
        "steps": args.steps,
        "recipe": {"batch_size": args.batch, "lr": args.lr, "adam_eps": args.adam_eps,
                   "weight_decay": 0.0, "grad_clip": args.grad_clip, "ema_decay": args.ema_decay,
                   "seed": args.seed, "mask_ratios": None if args.no_masks else MASK_RATIOS,
                   "scaling_factor": scaling_factor},
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in preset["model"].items()},
        "clips": len(data["captions"]),
        **summary,
        "seconds": round(summary["train_seconds"] + sample_seconds, 1),
        "sampling": {"steps": args.sample_steps, "cfg_scale": args.cfg_scale,
                     "seeds": list(args.seeds), "seconds": round(sample_seconds, 1),
                     "latents": _relative(out), "shape": list(latents.shape)},
        "loss_csv": _relative(loss_csv),
    }
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return record


def _relative(path: Path) -> str:
    """A path as the record shows it: from the repository root when it lies inside."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    main()
