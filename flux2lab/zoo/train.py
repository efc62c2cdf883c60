"""`python -m flux2lab.zoo.train`: train the `mini` model and its yardstick on the synthetic world.

Four phases on one device, each given a share of a wall-clock budget (so the run ends on time whatever the
GPU): the frozen text encoder is drawn from a seed; the VAE learns to reconstruct world images; the yardstick
learns to read scenes (from clean renders and from VAE reconstructions, so it reads generated images as
well as real ones); the transformer learns FLUX.2's flow-matching objective on VAE latents. The transformer
sees exactly what `Flux2Pipeline` gives it: latents through the pipeline's own `_encode_vae_image` and
`_pack_latents` (patchified, normalised by the VAE's batch-norm statistics), prompt embeddings from its
`encode_prompt`, its position ids, `timestep = sigma` and `guidance = 4.0`, sigmas drawn from the shifted
schedule the sampler visits. Then the weights are written and the model is scored (`flux2lab.zoo.evaluate`).

Outputs in --out: vae/transformer/text_encoder/yardstick.safetensors, train_report.json, samples.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from flux2lab.cli import command_parser, device_name, positive_float, positive_int, run_main, seed_int
from flux2lab.common.errors import Flux2LabError
from flux2lab.common.files import prepare_output_dir
from flux2lab.zoo import mini, store, world, yardstick

# Shares of --budget-s per phase; the transformer gets what the others leave.
VAE_SHARE, YARDSTICK_SHARE = 0.15, 0.07
KL_WEIGHT = 1e-4  # per latent element; keeps the latent space smooth without blurring reconstructions
STEP_RANGE = (4, 100)  # the transformer trains on the sigma schedules of 4..100-step sampling

HPARAMS = {
    "mini": dict(
        images=50_000,
        vae_batch=64,
        yardstick_batch=256,
        batch=256,
        captions=30_000,
        renders=4,
        lr=5e-4,
        warmup=300,
        ema=0.999,
    ),
    "smoke": dict(
        images=16, vae_batch=4, yardstick_batch=8, batch=4, captions=32, renders=1, lr=1e-3, warmup=1, ema=0.9
    ),
}


class Clock:
    """Deadlines within the budget, and the optional cap on steps per phase."""

    def __init__(self, max_steps: int | None):
        self.start, self.max_steps = time.perf_counter(), max_steps

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def running(self, step: int, deadline: float) -> bool:
        if self.max_steps is not None and step >= self.max_steps:
            return False
        return step == 0 or self.elapsed() < deadline


def _mean_last(losses: list[torch.Tensor], n: int) -> float:
    """Mean of the last n losses (kept on the device while training: no sync per step)."""
    return float(torch.stack(losses[-n:]).float().mean())


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _render(scenes: list[world.Scene], seed: int, device: torch.device, chunk: int = 2048) -> torch.Tensor:
    return torch.cat(
        [world.render(scenes[i : i + chunk], seed + i, device=device) for i in range(0, len(scenes), chunk)]
    )


class ImagePool:
    """World images rendered once on the device (uint8) with their labels; batches are drawn there, so the
    training loops never wait for the host (a per-step render would sync on every host-to-device copy)."""

    def __init__(self, n: int, seed: int, device: torch.device):
        scenes = world.sample_scenes(n, seed, "all")
        self.images = (_render(scenes, seed, device) * 255).round().to(torch.uint8)
        self.targets = {k: v.to(device) for k, v in world.targets(scenes).items()}
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(len(self.images), (n,), generator=self.gen, device=self.images.device)
        return self.images[idx].float() / 255, {k: v[idx] for k, v in self.targets.items()}


# ------------------------------------------------------------------------------------------------- VAE


def train_vae(vae, pool: ImagePool, clock: Clock, deadline: float, hp: dict, device: torch.device) -> dict:
    vae.train()
    opt = torch.optim.AdamW(
        vae.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda"
    )
    step, losses = 0, []
    while clock.running(step, deadline):
        x = pool.batch(hp["vae_batch"])[0] * 2 - 1
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
        step += 1
    vae.eval()
    return {"steps": step, "final_loss": _mean_last(losses, 50), "seconds": clock.elapsed()}


@torch.no_grad()
def set_latent_statistics(pipe, pool: ImagePool, n: int) -> None:
    """The VAE's batch-norm running stats := mean and variance of patchified latents (the pipeline's)."""
    x = pool.images[:n].float() / 255
    z = pipe._patchify_latents(pipe.vae.encode(x * 2 - 1).latent_dist.mode().float())
    pipe.vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
    pipe.vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x in [0,1] -> decode(encode(x).mode()) in [0,1]."""
    with _autocast(device):
        r = vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample.float()
    return ((r + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [0, 1]. Not flux2lab.metrics.psnr: importing that module loads
    open_clip, torchvision and torchmetrics, which the training GPU may lack (see yardstick.frechet_distance)."""
    return float((10 * torch.log10(1 / ((a - b) ** 2).mean(dim=(1, 2, 3)))).mean())


# ------------------------------------------------------------------------------------------- yardstick


def train_yardstick(
    model, vae, pool: ImagePool, clock: Clock, deadline: float, hp: dict, device: torch.device
) -> dict:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4, fused=device.type == "cuda")
    step, losses = 0, []
    while clock.running(step, deadline):
        x, target = pool.batch(hp["yardstick_batch"])
        half = len(x) // 2  # half the batch as the VAE returns it: generated images look like that
        x = torch.cat([reconstruct(vae, x[:half], device), x[half:]])
        x = (x + torch.randn_like(x) * torch.rand(len(x), 1, 1, 1, device=device) * 0.04).clamp(0, 1)
        with _autocast(device):
            loss = model.loss(x, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        step += 1
    model.eval()
    return {"steps": step, "final_loss": _mean_last(losses, 50), "seconds": clock.elapsed()}


@torch.no_grad()
def yardstick_report(model, vae, n: int, seed: int, device: torch.device) -> dict:
    """The yardstick's accuracy on fresh real images (held-out captions) and on their VAE reconstructions."""
    scenes = world.sample_scenes(n, seed, "heldout")
    x = _render(scenes, seed, device)
    recon = reconstruct(vae, x, device)
    out = {"vae_psnr_db": psnr(recon, x)}
    for name, images in (("real", x), ("vae_reconstruction", recon)):
        seen = yardstick.read(model, images)
        out[f"yardstick_accuracy_{name}"] = float(
            np.mean([np.mean(yardstick.facts(s, t)) for s, t in zip(seen, scenes)])
        )
        out[f"yardstick_exact_{name}"] = float(np.mean([s == t for s, t in zip(seen, scenes)]))
    return out


# ----------------------------------------------------------------------------------------- transformer


@torch.no_grad()
def caption_pool(pipe, n: int, seed: int, device: torch.device) -> tuple[list[world.Scene], torch.Tensor]:
    """n distinct training scenes and their prompt embeddings, made by the pipeline's own encode_prompt."""
    info = pipe.flux2lab_model
    scenes = list({s.caption: s for s in world.sample_scenes(n, seed + 5, "train")}.values())
    embeds = []
    for i in range(0, len(scenes), 512):
        e, _ = pipe.encode_prompt(
            [s.caption for s in scenes[i : i + 512]],
            device=device,
            max_sequence_length=info.max_sequence_length,
            text_encoder_out_layers=info.text_encoder_out_layers,
        )
        embeds.append(e.float())
    return scenes, torch.cat(embeds)


def sigma_range() -> tuple[float, float]:
    """mu of FLUX.2's empirical shift for this image size, over STEP_RANGE sampling steps."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    tokens = (mini.RESOLUTION // 8) ** 2
    mus = [compute_empirical_mu(tokens, steps) for steps in STEP_RANGE]
    return min(mus), max(mus)


@torch.no_grad()
def latent_pool(
    pipe, scenes: list[world.Scene], renders: int, seed: int, device: torch.device
) -> torch.Tensor:
    """(renders, len(scenes), tokens, channels): each scene rendered `renders` times (fresh jitter), encoded
    as the pipeline encodes images (`_encode_vae_image`: patchified, batch-norm normalised; in float32) and
    packed into tokens (`_pack_latents`)."""
    out = []
    for r in range(renders):
        for i in range(0, len(scenes), 1024):
            x = world.render(scenes[i : i + 1024], seed + r * len(scenes) + i, device=device)
            out.append(pipe._pack_latents(pipe._encode_vae_image(x * 2 - 1, generator=None)))
    return torch.cat(out).view(renders, len(scenes), *out[0].shape[1:])


def train_transformer(pipe, clock: Clock, deadline: float, hp: dict, seed: int, device: torch.device) -> dict:
    transformer = pipe.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    scenes, embeds = caption_pool(pipe, hp["captions"], seed, device)
    latents = latent_pool(pipe, scenes, hp["renders"], seed + 8, device)
    side = mini.RESOLUTION // pipe.vae_scale_factor // 2  # tokens per side
    latent_ids = pipe._prepare_latent_ids(torch.zeros(1, 1, side, side)).to(device)
    text_ids = pipe._prepare_text_ids(embeds[:1]).to(device)
    print(
        f"[{clock.elapsed():6.1f}s] {len(scenes)} captions, {latents.shape[0] * latents.shape[1]} latents",
        flush=True,
    )
    mu_low, mu_high = sigma_range()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=hp["lr"], betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda"
    )
    gen = torch.Generator(device="cpu").manual_seed(seed + 6)  # the shift of each step
    dgen = torch.Generator(device=device).manual_seed(
        seed + 7
    )  # samples, noise and times, drawn on the device
    start, step, losses = clock.elapsed(), 0, []
    while clock.running(step, deadline):
        # Learning rate by time: linear warm-up, then cosine to a tenth by the deadline.
        frac = min(1.0, (clock.elapsed() - start) / max(deadline - start, 1e-6))
        scale = min(1.0, (step + 1) / hp["warmup"]) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = hp["lr"] * scale

        idx = torch.randint(len(scenes), (hp["batch"],), generator=dgen, device=device)
        which = torch.randint(latents.shape[0], (hp["batch"],), generator=dgen, device=device)
        x0 = latents[which, idx]
        noise = torch.randn(x0.shape, generator=dgen, device=device)
        u = torch.rand(len(x0), generator=dgen, device=device).clamp(1e-4, 1.0)
        mu = mu_low + (mu_high - mu_low) * torch.rand((), generator=gen).item()
        sigma = pipe.scheduler.time_shift(mu, 1.0, u)  # the sampler's shifted sigmas
        xt = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
        with _autocast(device):
            pred = transformer(
                hidden_states=xt,
                encoder_hidden_states=embeds[idx],
                timestep=sigma,
                guidance=torch.full_like(sigma, mini.GUIDANCE),
                img_ids=latent_ids,
                txt_ids=text_ids,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(hp["ema"], (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(transformer.parameters()), 1 - decay)
        losses.append(loss.detach())
        step += 1
    transformer.load_state_dict(ema.state_dict())
    transformer.eval()
    curve = torch.stack(losses).float().cpu()
    return {
        "steps": step,
        "captions": len(scenes),
        "final_loss": _mean_last(losses, 100),
        "batch": hp["batch"],
        "seconds": clock.elapsed(),
        "loss_curve": [float(c.mean()) for c in curve.chunk(min(20, len(curve)))],
    }


# ------------------------------------------------------------------------------------------------- main


def save_samples(path: Path, real: torch.Tensor, generated, columns: int = 8) -> None:
    """Pairs of rows: real renders of held-out captions above what the model made for them (white gaps)."""
    from PIL import Image

    gen = yardstick.to_tensor(generated)
    rows = []
    for i in range(0, len(gen), columns):
        for part in (real[i : i + columns].cpu(), gen[i : i + columns]):
            rows.append(torch.cat([part, torch.ones(columns - len(part), *part.shape[1:])]))  # full rows
    tiles = F.pad(torch.cat(rows), (1, 1, 1, 1), value=1.0)  # (N, 3, h, w)
    _, _, h, w = tiles.shape
    grid = tiles.view(-1, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(-1, columns * w, 3)
    Image.fromarray((grid * 255).round().byte().numpy()).save(path)


def evaluate_all(out: Path, yardstick_model, n: int, steps: int, device: torch.device, seed: int) -> dict:
    from flux2lab.pipeline.models import default_dtype, load_pipeline
    from flux2lab.pipeline.recipe import Recipe
    from flux2lab.zoo.evaluate import FLOOR_SEED, evaluate, real_images

    real = real_images(max(n, 500))
    recipe = Recipe(steps=steps)
    report = {
        "steps": steps,
        "n": n,
        "domain_fid_real_vs_real": yardstick.domain_fid(
            yardstick_model, real, real_images(max(n, 500), seed=FLOOR_SEED)
        ),
    }
    for name, loader in (
        ("mini", lambda: mini.build_mini(str(device), default_dtype(device), folder=out)),
        ("tiny", lambda: load_pipeline("tiny", device=str(device))),
    ):
        t = time.perf_counter()
        ev = evaluate(loader(), recipe, n=n, batch_size=50, real=real, model=yardstick_model)
        report[name] = {**ev.to_dict(), "seconds": time.perf_counter() - t}
        if name == "mini":
            scenes = world.sample_scenes(min(n, 32), 0, split="heldout")
            save_samples(out / "samples.png", world.render(scenes, 0), ev.images[: len(scenes)])
    return report


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "zoo.train",
        description="Train the mini model (VAE, transformer; text encoder drawn from a seed) and its "
        "yardstick on the synthetic world, within a wall-clock budget; then score it on held-out captions.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (the shipped one: flux2lab/zoo/weights)"
    )
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=390.0,
        help="wall-clock seconds for training, all phases; evaluation comes on top",
    )
    p.add_argument("--device", type=device_name, default=None, help="cuda | cpu (default: cuda if present)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the weights, the text encoder and the training images")
    p.add_argument("--smoke", action="store_true", help="tiny networks and batches: checks the code on a CPU")
    p.add_argument("--max-steps", type=positive_int, help="cap on optimisation steps per phase (tests)")
    p.add_argument("--batch", type=positive_int, help="transformer batch size (default: 256; smoke 4)")
    p.add_argument("--captions", type=positive_int, help="distinct training captions (default: 30000; smoke 32)")
    p.add_argument("--renders", type=positive_int, help="renders (jitter variants) per training caption (default: 4)")
    p.add_argument(
        "--eval-n", type=int, default=200, help="held-out captions to score at the end"
    )
    p.add_argument("--eval-steps", type=positive_int, default=50, help="sampling steps for that score")
    p.add_argument("--no-eval", action="store_true", help="skip the final scoring")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="keep the VAE, text encoder and yardstick of an earlier run in DIR and spend the whole "
        "budget training its transformer further",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Flux2LabError(
            "--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu."
        )
    if args.eval_n < 2 and not args.no_eval:
        raise Flux2LabError("--eval-n must be at least 2 (domain FID needs two images), or pass --no-eval.")
    prepare_output_dir(args.out, "--out")
    size = "smoke" if args.smoke else "mini"
    cfg, hp = mini.SIZES[size], dict(HPARAMS[size])
    hp.update({k: getattr(args, k) for k in ("batch", "captions", "renders") if getattr(args, k) is not None})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
    clock = Clock(args.max_steps)
    torch.manual_seed(args.seed)
    out = args.out

    report: dict = {
        "size": size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "budget_s": args.budget_s,
        "seed": args.seed,
        "hparams": hp,
    }
    if args.resume:
        # Continue the transformer of an earlier run; its VAE, text encoder and yardstick stay as they are.
        cfg = {name: store.read_config(store.path_of(name, args.resume)) for name in store.FILES}
        pipe = mini.build_mini(str(device), torch.float32, folder=args.resume)
        vae, text_encoder, transformer = pipe.vae, pipe.text_encoder, pipe.transformer
        ys = yardstick.load(args.resume, str(device))
        earlier = args.resume / "train_report.json"
        earlier = json.loads(earlier.read_text()) if earlier.is_file() else {}
        report.update(
            resumed_from=str(args.resume),
            vae=earlier.get("vae"),
            yardstick=earlier.get("yardstick"),
            earlier_transformer=earlier.get("transformer"),
        )
    else:
        cfg = dict(cfg, yardstick={"width": 32, "features": yardstick.FEATURES})
        text_encoder = mini.build_frozen_text_encoder(cfg["text_encoder"], seed=args.seed)
        vae, transformer = mini.build_vae(cfg["vae"]), mini.build_transformer(cfg["transformer"])
        pipe = mini.assemble(vae, text_encoder, transformer, cfg["text_encoder"], "mini", None).to(device)
        ys = yardstick.Yardstick(**cfg["yardstick"]).to(device)
        pool = ImagePool(hp["images"], args.seed + 1, device)
        print(f"[{clock.elapsed():6.1f}s] VAE ({len(pool.images)} images)", flush=True)
        report["vae"] = train_vae(vae, pool, clock, args.budget_s * VAE_SHARE, hp, device)
        set_latent_statistics(pipe, pool, 1024)
        print(f"[{clock.elapsed():6.1f}s] yardstick ({report['vae']})", flush=True)
        report["yardstick"] = train_yardstick(
            ys, vae, pool, clock, args.budget_s * (VAE_SHARE + YARDSTICK_SHARE), hp, device
        )
        del pool
        report["yardstick"].update(
            yardstick_report(ys, vae, 2000 if size == "mini" else 8, args.seed + 2, device)
        )
    print(f"[{clock.elapsed():6.1f}s] transformer ({report['yardstick']})", flush=True)
    report["transformer"] = train_transformer(pipe, clock, args.budget_s, hp, args.seed, device)
    print(f"[{clock.elapsed():6.1f}s] saving ({report['transformer']})", flush=True)

    for name, module in (
        ("vae", vae),
        ("text_encoder", text_encoder),
        ("transformer", transformer),
        ("yardstick", ys),
    ):
        store.save(module, store.path_of(name, out), cfg[name])
    report["weights_mb"] = sum(store.path_of(n, out).stat().st_size for n in store.FILES) / 2**20
    report["train_seconds"] = clock.elapsed()
    report_path = out / "train_report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")  # written again with the scores below
    if not args.no_eval:
        ys_loaded = yardstick.load(store.path_of("yardstick", out), str(device))  # as shipped (float16)
        report["evaluation"] = evaluate_all(out, ys_loaded, args.eval_n, args.eval_steps, device, args.seed)
    report["total_seconds"] = clock.elapsed()
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    summary = (
        f"yardstick accuracy on real images {(report['yardstick'] or {}).get('yardstick_accuracy_real')}"
    )
    if ev := report.get("evaluation"):
        summary += (
            f"; mini attribute accuracy {ev['mini']['attribute_accuracy']:.3f}; domain FID mini "
            f"{ev['mini']['domain_fid']:.2f} vs tiny {ev['tiny']['domain_fid']:.2f}"
        )
    print(
        f"[{clock.elapsed():6.1f}s] done: {out}; {summary}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
