"""``report.md``: a few summary lines that say what is better or worse, then the tables and pictures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from radial_lora.files import from_jsonable, jsonable, write_text_atomic


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.3e}"
    return str(value)


def _cell(results: dict[str, Any], variant: str, length: int) -> dict[str, Any] | None:
    return next((c for c in results["cells"] if c["variant"] == variant and c["length"] == length), None)


def _q(cell: dict[str, Any] | None, key: str) -> float | None:
    value = None if cell is None else cell["quality"].get(key)
    return value if isinstance(value, int | float) else None


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Plain sentences comparing the variants: speed, approximation quality, LoRA effect, drift."""
    lines: list[str] = []
    for length in results["lengths"]:
        dense, radial = _cell(results, "base_dense", length), _cell(results, "base_radial", length)
        if dense and radial:
            a = radial["attention"]
            speed = dense["wall_time_s"] / radial["wall_time_s"] if radial["wall_time_s"] > 0 else math.nan
            lines.append(
                f"{length} frames: radial attention computes {a['effective_density']:.0%} of the dense attention "
                f"FLOPs (mask density {a['mask_density']:.0%}, ideal {a['ideal_speedup']:.2f}x); measured wall "
                f"time {'faster' if speed > 1 else 'slower'}: {speed:.2f}x ({_fmt(radial['wall_time_s'])}s vs "
                f"{_fmt(dense['wall_time_s'])}s per video)."
            )
        for weights in ("base", "lora", "lora2"):
            cell = _cell(results, f"{weights}_radial", length)
            if cell is None or _q(cell, "psnr") is None:
                continue
            lines.append(
                f"{length} frames, {weights} radial vs {cell['reference']}: PSNR {_fmt(_q(cell, 'psnr'))} dB, "
                f"SSIM {_fmt(_q(cell, 'ssim'), 4)}; quality drop first->last quarter {_fmt(_q(cell, 'psnr_drop'))} dB."
            )
        base, lora = _cell(results, "base_radial", length), _cell(results, "lora_radial", length)
        if base and lora and base.get("heldout_loss") is not None and lora.get("heldout_loss") is not None:
            b, lo = base["heldout_loss"], lora["heldout_loss"]
            verdict = "better (lower)" if lo < b else "worse (higher)" if lo > b else "equal"
            lines.append(
                f"{length} frames: the LoRA's held-out loss under radial attention is {verdict}: "
                f"{lo:.4g} vs base {b:.4g} ({(lo - b) / b:+.1%})."
            )
        if base and lora:
            tb, tl = _q(base, "temporal_consistency"), _q(lora, "temporal_consistency")
            if tb is not None and tl is not None:
                lines.append(
                    f"{length} frames: temporal consistency LoRA radial {tl:.4f} vs base radial {tb:.4f} "
                    f"(dense reference {_fmt(_q(lora, 'reference_temporal_consistency'), 4)})."
                )
    return lines or ["No comparable cells (the grid needs base_dense and a radial variant at the same length)."]


_COLUMNS = [
    ("variant", lambda c: c["variant"]),
    ("PSNR dB", lambda c: _fmt(_q(c, "psnr"))),
    ("SSIM", lambda c: _fmt(_q(c, "ssim"), 4)),
    ("PSNR drop", lambda c: _fmt(_q(c, "psnr_drop"))),
    ("temporal", lambda c: _fmt(_q(c, "temporal_consistency"), 4)),
    ("attn density", lambda c: _fmt(c["attention"]["effective_density"])),
    ("attn TFLOPs", lambda c: _fmt(c["attention"]["attention_flops"] / 1e12)),
    ("wall s", lambda c: _fmt(c["wall_time_s"])),
    ("peak GiB", lambda c: _fmt(c["peak_memory_bytes"] / 2**30)),
    ("held-out loss", lambda c: _fmt(c.get("heldout_loss"), 4)),
    ("vs", lambda c: c["reference"] or "-"),
]


def sample_lines(results: dict[str, Any]) -> list[str]:
    """The sample-score table (variant x length: all right, and colour / shape / direction), or nothing."""
    scored = [c for c in results["cells"] if c.get("sample_score")]
    if not scored:
        return []
    lengths = sorted({c["length"] for c in scored})
    variants = list(dict.fromkeys(c["variant"] for c in scored))
    out = [
        "## Samples: do the videos show their captions?",
        "",
        f"Each video scored against its sample caption ({scored[0]['sample_score']['n']} per cell): colour, shape "
        "and direction all right (in brackets colour / shape / direction alone).",
        "",
        "| variant | " + " | ".join(f"{n} frames" for n in lengths) + " |",
        "|" + "---|" * (len(lengths) + 1),
    ]
    for name in variants:
        row = []
        for n in lengths:
            cell = _cell(results, name, n)
            sc = cell.get("sample_score") if cell else None
            parts = " / ".join(f"{sc[k]:.2f}" for k in ("colour", "shape", "direction")) if sc else ""
            row.append(f"**{sc['all']:.2f}** ({parts})" if sc else "-")
        out.append(f"| {name} | " + " | ".join(row) + " |")
    return out + [""]


def motion_lines(results: dict[str, Any]) -> list[str]:
    """Motion and failures per variant and length (docs/EVALUATION.md): what a long video gets wrong."""
    cells = [c for c in results["cells"] if c.get("motion")]
    if not cells:
        return []
    lengths = sorted({c["length"] for c in cells})
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    real = results.get("real") or {}
    has_real = bool(real)
    head = "motion vs real (1.0 = as much)" if has_real else "motion (short sides / s)"
    out = [
        "## Motion at length: does the video keep moving, and does it loop, freeze or fade?",
        "",
        f"Per cell: {head}, and the share of videos frozen / looping / degrading "
        "(`radial_lora.eval.long_video`; docs/EVALUATION.md)."
        + (
            " The real row is the held-out clips, decoded from their latents by the same VAE."
            if has_real
            else " With --dataset the real clips of that dataset are the reference."
        ),
        "",
        "| variant | " + " | ".join(f"{n} frames" for n in lengths) + " |",
        "|" + "---|" * (len(lengths) + 1),
    ]

    def entry(m: dict[str, Any] | None) -> str:
        if not m:
            return "-"
        value = m["motion_ratio"] if has_real else m["motion"]
        r = m["failure_rates"]
        return f"**{_fmt(value, 2)}** ({r['frozen']:.2f} / {r['looping']:.2f} / {r['degrading']:.2f})"

    if has_real:

        def real_entry(n: int) -> str:
            r = real.get(str(n))
            rates = " / ".join(f"{x:.2f}" for x in r["failure_rates"].values()) if r else ""
            return f"{_fmt(r['motion'], 2)} /s ({rates})" if r else "-"

        out.append("| real | " + " | ".join(real_entry(n) for n in lengths) + " |")
    for name in variants:
        out.append(
            f"| {name} | " + " | ".join(entry((_cell(results, name, n) or {}).get("motion")) for n in lengths) + " |"
        )
    longest = lengths[-1]
    out += [
        "",
        f"Per quarter of the {longest}-frame videos ({head}):",
        "",
        "| variant | Q1 | Q2 | Q3 | Q4 |",
        "|---|---|---|---|---|",
    ]
    for name in variants:
        m = (_cell(results, name, longest) or {}).get("motion")
        if m:
            qs = m["motion_ratio_quarters"] if has_real and m["motion_ratio_quarters"] else m["motion_quarters"]
            out.append(f"| {name} | " + " | ".join(_fmt(q, 2) for q in qs) + " |")
    return out + [""]


def render_report(results_json: dict[str, Any], plots: dict[str, Any]) -> str:
    """The markdown text of the report (``results_json`` as written, inf as the string "inf")."""
    results = from_jsonable(results_json)
    s = results["settings"]
    out = [
        "# Radial LoRA evaluation",
        "",
        f"Model `{results['model']}` ({results['family']}), {len(results['prompts'])} prompt(s), "
        f"{s['height']}x{s['width']}, {s['steps']} steps, guidance {s['guidance']}, seed {s['seed']}; "
        f"lengths {', '.join(map(str, results['lengths']))} frames; variants "
        f"{', '.join(v['name'] for v in results['variants'])}.",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary_lines(results)],
        "",
        *motion_lines(results),
        *sample_lines(results),
    ]
    for length in results["lengths"]:
        cells = [c for c in results["cells"] if c["length"] == length]
        if not cells:
            continue
        a = cells[0]["attention"]
        columns = [col for col in _COLUMNS if col[0] != "held-out loss" or results.get("heldout")]
        out += [
            f"## {length} frames ({a['latent_frames']} latent frames x {a['tokens_per_frame']} tokens)",
            "",
            "| " + " | ".join(name for name, _ in columns) + " |",
            "|" + "---|" * len(columns),
            *["| " + " | ".join(str(get(c)) for _, get in columns) + " |" for c in cells],
            "",
        ]
    if results.get("heldout"):
        lengths = sorted({int(b) for h in results["heldout"].values() for b in h["per_bucket"]})
        out += [
            "## Held-out flow-matching loss per length (lower is better)",
            "",
            "| variant | " + " | ".join(f"{n} frames" for n in lengths) + " | mean | clips |",
            "|" + "---|" * (len(lengths) + 3),
        ]
        for name, h in results["heldout"].items():
            row = [_fmt(h["per_bucket"].get(str(n)), 4) for n in lengths]
            out.append(f"| {name} | " + " | ".join(row) + f" | {_fmt(h['mean'], 4)} | {h['count']} |")
        out.append("")
    out += ["## Pictures", ""]
    if "motion" in plots:
        out += [f"![motion over time]({plots['motion']})", ""]
    if "metrics" in plots:
        out += [f"![metrics vs length]({plots['metrics']})", ""]
    if "masks" in plots:
        out += [f"![radial masks]({plots['masks']})", ""]
    for key, rel in plots.get("strips", {}).items():
        out += [f"{key}: ![{key}]({rel})", ""]
    out += [
        "## How to read this",
        "",
        "- Motion: how far content keeps moving, in short sides of the frame per second; vs real = the cell's "
        "median over the real clips' median at that length (with --dataset). Frozen: still for a quarter of the "
        "clip or more; looping: a stretch of the clip comes back (played again or backwards); degrading: "
        "contrast, sharpness or colour 40% lower in the last quarter (docs/EVALUATION.md).",
        "- PSNR/SSIM compare each video with the dense-attention video of the same weights, prompt, seed and "
        "length (column `vs`), as the Radial Attention paper does; `inf` dB / SSIM 1 means identical.",
        "- PSNR drop: PSNR of the first quarter minus the last; large positive values mean errors grow along time.",
        "- temporal: 1 - mean absolute change between consecutive frames; compare with the dense reference's.",
        "- attn density / TFLOPs: self-attention work of the whole generation relative to dense (video tokens).",
        "- Peak memory is CUDA `max_memory_allocated`, or the process RSS on CPU (includes the weights).",
        "- Every number is in `results.json`; the videos are under `videos/`.",
        "",
    ]
    return "\n".join(out)


def write_report(out_dir: Path, results_json: dict[str, Any], plots: dict[str, Any]) -> Path:
    """Write ``report.md`` atomically; returns its path."""
    return write_text_atomic(Path(out_dir) / "report.md", render_report(jsonable(results_json), plots))
