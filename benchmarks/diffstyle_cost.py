"""DiffStyle: UNet evaluations and wall time of an S × C set, against the naive way that inverts the style and the
content image again for every pair. Feeds the table "DiffStyle cost" of docs/results/performance.md.

    python benchmarks/diffstyle_cost.py --styles 10 --contents 10 --steps 50 --size 64

Both make the same S·C anomalies with the same UNet (random weights: only the cost is measured) and agree on the
images. The minimum is (S + C) inversions + S·C generations, i.e. (S + C)·(N − 1) + C + S·C·(N + N_edit) image
passes for N DDIM steps of which N_edit are at t ≥ t_edit (an inversion calls the UNet at every timestep but the top
one, a content image once more there for its h; each edited generation step is one batched pass over ε and ε̃).
Prints one JSON object per way and one with the ratios (naive / ours).

``--doc PAGE`` (e.g. ``--doc docs/results/performance.md``) also rewrites the page's block
``<!-- begin: diffstyle_cost -->`` ... ``<!-- end: ... -->`` with the command and the table of this run; the rest of
the page is left as it is.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build_unet(size: int, channels: tuple[int, ...]):
    from diffusers import UNet2DModel

    n = len(channels)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), norm_num_groups=8,
                       attention_head_dim=8).eval()


def main(argv=None) -> list[dict]:
    from anomgen.generators.diffstyle import DiffStyle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", type=int, default=10)
    parser.add_argument("--contents", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--t-edit", type=int, default=400)
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = build_unet(args.size, tuple(args.channels)).to(device)
    ds = DiffStyle(unet, num_inference_steps=args.steps, t_edit=args.t_edit, t_boost=-1)
    g = torch.Generator().manual_seed(1)
    styles = torch.rand(args.styles, 3, args.size, args.size, generator=g)
    contents = torch.rand(args.contents, 3, args.size, args.size, generator=g)
    n_pairs = args.styles * args.contents
    n_edit = sum(t >= args.t_edit for t in ds.schedule.timesteps)
    minimum = (args.styles + args.contents) * (args.steps - 1) + args.contents + n_pairs * (args.steps + n_edit)
    rows = []

    def record(name: str, seconds: float, evaluations: int) -> dict:
        row = {"name": name, "styles": args.styles, "contents": args.contents, "steps": args.steps,
               "size": args.size, "unet_evaluations": evaluations, "minimum_evaluations": minimum,
               "seconds": round(seconds, 3), "device": device}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    ds.eps.evaluations = 0
    t0 = time.perf_counter()
    ours = torch.cat([images for _, images in ds.cross_product(styles, contents, seed=0, batch_size=args.batch_size)])
    a = record("diffstyle_invert_once", time.perf_counter() - t0, ds.eps.evaluations)

    ds.eps.evaluations = 0
    t0 = time.perf_counter()
    naive = []
    for lo in range(0, n_pairs, args.batch_size):
        idx = range(lo, min(lo + args.batch_size, n_pairs))
        s = ds.invert(styles[[i // args.contents for i in idx]], keep_h=False)  # inverted again for every pair
        c = ds.invert(contents[[i % args.contents for i in idx]])
        naive.append(ds.generate(s, c))
    b = record("diffstyle_invert_per_pair", time.perf_counter() - t0, ds.eps.evaluations)
    max_diff = float((torch.cat(naive) - ours).abs().max())
    summary = {"name": "diffstyle_cost_ratio", "evaluations_naive_over_ours": b["unet_evaluations"] /
               a["unet_evaluations"], "seconds_naive_over_ours": b["seconds"] / a["seconds"],
               "ours_equals_minimum": a["unet_evaluations"] == minimum, "max_abs_image_diff": max_diff,
               "device": device}
    print(json.dumps(summary), flush=True)
    rows.append(summary)
    if args.doc:
        import sys

        from docpage import table, write_doc

        minimum_note = " (= the minimum (S+C)·(N−1) + C + S·C·(N+N_edit))" if summary["ours_equals_minimum"] else ""
        where = "CPU" if device == "cpu" else torch.cuda.get_device_name(0)
        body = table(["what", "ours", "baseline", "ratio"], [
            [f"{args.styles} × {args.contents} DiffStyle set, {args.steps} steps, {args.size} px random UNet "
             f"({where}): UNet image passes", f"{a['unet_evaluations']:,}{minimum_note}",
             f"{b['unet_evaluations']:,} (style and content inverted again for every pair)",
             f"{summary['evaluations_naive_over_ours']:.1f}× fewer"],
            ["same: wall time", f"{a['seconds']:.1f} s", f"{b['seconds']:.1f} s",
             f"{summary['seconds_naive_over_ours']:.2f}× faster"]])
        note = f"Both ways give the same images up to {max_diff:.1e} (batched float sums)."
        write_doc(args.doc, "diffstyle_cost", "diffstyle_cost.py", sys.argv[1:] if argv is None else argv, body, note)
    return rows


if __name__ == "__main__":
    main()
