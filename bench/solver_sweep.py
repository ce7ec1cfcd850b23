"""KID and FID against network calls for each sampler of a trained model.

    python bench/solver_sweep.py --config mnist --workdir /tmp/ddpm_mnist --num_samples 500 \
        --inception_path /path/to/inception-2015-12-05.pt --out /tmp/sweep

For each solver (--solvers, default dpm++2m, unipc3 and ddim) and step count (--steps,
default 10, 15, 20, 25, 50, 100), and for Algorithm 2 with all T steps, draws --num_samples
samples of the EMA parameters (the same seed for every row), and reports KID (mean ± std
over 100 subsets) and FID of their Inception features against --reference_split, and the
sampling time per sample (after the first chunk, which compiles). Algorithm 2 runs first
(or comes from an earlier run's OUT.json, --baseline), then the solvers by step count.
Writes OUT.json and OUT.md (the table) after every row and
OUT.png (KID against network calls, log scale) at the end, and prints for each solver the
fewest steps whose KID is within one std of Algorithm 2's, with the speed-up.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_jax import (  # noqa: E402
    checkpointing,
    config_lib,
    eval_modes,
    feature_metrics,
    fid,
    plots,
    sampling,
)


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the run's config (name or path)")
    parser.add_argument("--workdir", required=True, help="the training workdir")
    parser.add_argument("--inception_path", required=True, help="the FID Inception file")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=100, help="samples drawn at once")
    parser.add_argument("--solvers", default="dpm++2m,unipc3,ddim")
    parser.add_argument("--steps", default="10,15,20,25,50,100")
    parser.add_argument("--reference_split", default="test")
    parser.add_argument("--out", default="solver_sweep", help="OUT.json, OUT.md and OUT.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline", help="an earlier OUT.json whose Algorithm 2 row is reused (same model, "
        "seed and --num_samples) instead of drawing it again"
    )  # fmt: skip
    return parser.parse_args()


def rows_to_run(args, num_timesteps):
    """(method, steps) of every row: Algorithm 2 with all T (the baseline) first unless
    --baseline gives it, then the solvers' grid by step count, so that a run stopped early
    has the baseline and the smallest counts."""
    rows = [(m, int(n)) for m in args.solvers.split(",") for n in args.steps.split(",")]
    first = [] if args.baseline else [("ancestral", num_timesteps)]
    return first + sorted(rows, key=lambda row: row[1])


def read_baseline(path, step, num_samples):
    """The Algorithm 2 row of an earlier run of the same checkpoint and sample count."""
    earlier = json.loads(Path(path).read_text())
    row = earlier["rows"][0]
    if row["method"] != "ancestral" or earlier["step"] != step:
        raise SystemExit(f"--baseline {path}: no Algorithm 2 row of step {step} first")
    if earlier.get("num_samples", num_samples) != num_samples:
        raise SystemExit(f"--baseline {path} drew {earlier['num_samples']} samples per row")
    return row


def draw_features(config, params, method, steps, args, activations):
    """(features (N, 2048), sampling seconds per sample after the first chunk, which
    compiles) of one row; the Inception pass is not timed."""
    config = config.copy_and_resolve_references()
    config.sampling.update(method=method, num_steps=steps, batch_size=args.batch_size)
    sampler = sampling.Sampler(config_lib.build(config))
    chunks = sampler.chunks(params, jax.random.PRNGKey(args.seed), args.num_samples)
    features, seconds, timed = [], 0.0, 0
    for k in range(-(-args.num_samples // args.batch_size)):
        start = time.perf_counter()
        chunk = next(chunks).block_until_ready()
        if k > 0:
            seconds, timed = seconds + time.perf_counter() - start, timed + len(chunk)
        features.append(np.asarray(activations(chunk)["pool3"]))
    return np.concatenate(features)[: args.num_samples], seconds / max(timed, 1)


def measure(row, features, seconds, reference):
    kid, kid_std = feature_metrics.kid(reference.features, features)
    fid_value = fid.frechet_distance(*fid.feature_statistics(features), *reference[:2])
    method, steps = row
    return dict(
        method=method, steps=steps, calls=steps, kid=kid, kid_std=kid_std, fid=fid_value,
        seconds_per_sample=seconds,
    )  # fmt: skip


def summary(results):
    """For each solver: the fewest steps within one std of Algorithm 2's KID (the first
    row), and the wall-time ratio at that row."""
    base, rows = results[0], results[1:]
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        good = [
            r for r in rows if r["method"] == method and r["kid"] <= base["kid"] + base["kid_std"]
        ]  # fmt: skip
        if not good:
            lines.append(f"{method}: no step count within one std of Algorithm 2's KID")
            continue
        best = min(good, key=lambda r: r["steps"])
        ratio = base["seconds_per_sample"] / best["seconds_per_sample"]
        lines.append(
            f"{method}: {best['steps']} steps reach Algorithm 2's KID, {ratio:.1f}x faster"
        )
    return lines


def table(results):
    head = "| sampler | steps | KID ×10³ (± std) | FID | s / sample |\n|---|---|---|---|---|"
    body = [
        f"| {r['method']} | {r['steps']} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} "
        f"| {r['fid']:.2f} | {r['seconds_per_sample']:.4f} |"
        for r in results
    ]
    return "\n".join([head, *body])


def plot(path, results):
    """KID against network calls on a log axis, a line per solver, Algorithm 2 a dot."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, box = 560, 360, (60, 30, 540, 320)
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    calls = [r["calls"] for r in results]
    x_range = (np.log10(min(calls)) - 0.05, np.log10(max(calls)) + 0.05)
    kids = [r["kid"] for r in results]
    y_range = (min(0.0, min(kids)), max(kids) * 1.1)
    draw.rectangle(box, outline=(0, 0, 0))
    for tick in (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000):
        if x_range[0] <= np.log10(tick) <= x_range[1]:
            px, _ = plots.to_pixels(np.log10(tick), 0, box, x_range, y_range)
            draw.text((px - 8, box[3] + 4), str(tick), fill=(0, 0, 0), font=font)
    for ty in np.linspace(*y_range, 5):
        _, py = plots.to_pixels(x_range[0], ty, box, x_range, y_range)
        draw.text((4, py - 6), f"{ty:.3g}", fill=(0, 0, 0), font=font)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (0, 0, 0)]
    methods = list(dict.fromkeys(r["method"] for r in results))
    for i, method in enumerate(methods):
        rows = [r for r in results if r["method"] == method]
        px, py = plots.to_pixels(
            np.log10([r["calls"] for r in rows]), [r["kid"] for r in rows], box, x_range, y_range
        )
        points = list(zip(px.tolist(), py.tolist(), strict=True))
        colour = colours[i % len(colours)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((box[2] - 100, box[1] + 6 + 14 * i), method, fill=colour, font=font)
    title = "KID against network calls per sample (log scale)"
    draw.text((box[0], 8), title, fill=(0, 0, 0), font=font)
    image.save(path)


def main():
    args = parse()
    config = config_lib.load_config(args.config)
    config.eval.inception_path = args.inception_path
    params, step = checkpointing.restore_params(args.workdir, config)
    network = fid.load_network(args.inception_path)
    reference = fid.dataset_statistics(
        config, network, args.reference_split, eval_modes.stats_dir(config),
        config.eval.batch_size, features=True,
    )  # fmt: skip
    activations = fid.make_activations_fn(
        network[0], sampling.Sampler(config_lib.build(config)).mesh
    )
    results, out = [], Path(args.out)
    if args.baseline:
        results.append(read_baseline(args.baseline, step, args.num_samples))
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows_to_run(args, config.diffusion.num_timesteps):
        features, seconds = draw_features(config, params, *row, args, activations)
        results.append(measure(row, features, seconds, reference))
        print(json.dumps(results[-1]), flush=True)
        write(out, step, args.num_samples, results)  # after every row: a stopped run keeps them
    plot(out.with_suffix(".png"), results)
    print(f"EMA parameters of step {step}, {args.num_samples} samples per row\n")
    print(out.with_suffix(".md").read_text())


def write(out, step, num_samples, results):
    """OUT.json and OUT.md (the table and, once there are solver rows, the summary)."""
    record = dict(step=step, num_samples=num_samples, rows=results)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(table(results) + "\n\n" + "\n".join(summary(results)) + "\n")


if __name__ == "__main__":
    main()
