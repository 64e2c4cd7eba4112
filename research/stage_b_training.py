"""Stage (b) of the tiny preset's proof: the committed weights on captions of their training set.

Eight training captions (`synthetic.training_captions`: every colour, direction and background
among them), three seeds each: the sampled clips must move the captioned way in at least 90%.
Alongside, the temporal coherence of the model's clean-clip estimate as noise falls: training
clips noised to t, denoised in one step, decoded, and the share of frames that show one steady
blob (a model that draws one shape at the start of sampling keeps it).

    .venv/bin/python research/stage_b_training.py   # ~3 CPU minutes -> stage_b_training.json
"""

from __future__ import annotations

import numpy as np
from clips import committed_tiny
from mindspore import Tensor
from stages import pooled, sample_scores, write_record

from opensora.data.synthetic import parse_caption, random_spec, render_clip, training_captions
from opensora.evaluation import as_uint8_frames, coherent_frames
from opensora.runtime import configure
from opensora.schedulers.iddpm import IDDPM
from opensora.train import caption_embeddings, decode_latents, micro_condition_arrays

SEEDS = (0, 1, 2)
TIMESTEPS = (900, 700, 500, 300, 100)
ATTRIBUTES = ("color", "shape", "direction", "background")


def coherence_as_noise_falls(captions: list[str]) -> dict[str, float]:
    """Share of coherent frames in the decoded one-step clean estimate, per timestep."""
    preset, model, vae, text_encoder = committed_tiny()
    rng = np.random.default_rng(0)
    specs = [random_spec(rng, *(parse_caption(c)[k] for k in ATTRIBUTES)) for c in captions]
    video = np.stack([render_clip(s) for s in specs]).astype(np.float32) / 127.5 - 1.0
    x = vae.encode(Tensor(video.transpose(0, 4, 1, 2, 3)), sample_posterior=False).asnumpy()
    y, mask = caption_embeddings(text_encoder, [s.caption for s in specs])
    kwargs = {"y": Tensor(y[:, None]), "mask": Tensor(mask.astype(np.int32)),
              **{k: Tensor(v) for k, v in micro_condition_arrays(
                  len(specs), preset.num_frames, preset.image_size, preset.fps).items()}}
    diffusion = IDDPM(noise_schedule=preset.noise_schedule)
    out = {}
    for t in TIMESTEPS:
        t_batch = Tensor(np.full(len(x), t, np.int32))
        noise = Tensor(rng.standard_normal(x.shape).astype(np.float32))
        x_t = diffusion.q_sample(Tensor(x), t_batch, noise)
        guess = diffusion.p_mean_variance(model, x_t, t_batch, clip_denoised=False,
                                          model_kwargs=kwargs)["pred_xstart"].asnumpy()
        clips = decode_latents(vae, guess)
        out[str(t)] = float(np.mean([coherent_frames(as_uint8_frames(c)).mean()
                                     for c in clips]))
    return out


def main() -> None:
    configure()
    captions = training_captions()
    scores, _ = sample_scores(captions, SEEDS)
    for score in scores:
        print(score.table())
    write_record(__file__, {
        "captions": captions,
        "seeds": list(SEEDS),
        "scores": pooled(scores),
        "target_motion_accuracy": 0.9,
        "coherence_of_one_step_estimate_by_timestep": coherence_as_noise_falls(captions),
    })


if __name__ == "__main__":
    main()
