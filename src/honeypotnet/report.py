"""A verification report people can look at: `honeypotnet verify --report FILE.html` (and FILE.png).

One page: the verdict with its numbers (ASR and its confidence interval against tau0, the p-value, alpha,
queries), the bundle's and the trigger's hashes, and a figure: clean held-out images, the same images
stamped with the trigger, the trigger itself amplified to full contrast, and the suspect's answers to each.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import time
from pathlib import Path

import torch

from .ops import atomic_write_bytes, atomic_write_text, to_float
from .verify import VerificationResult, clopper_pearson_upper


def trigger_hash(trigger) -> str:
    """SHA-256 of the trigger's pattern and mask (float32 bytes): what identifies the secret."""
    h = hashlib.sha256()
    for t in (trigger.pattern, trigger.mask):
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def amplified(trigger) -> torch.Tensor:
    """The trigger δ as a picture (3,H,W) in [0,1]: mid-grey = 0, stretched to full contrast, masked area only."""
    d = trigger.pattern.detach().cpu() * trigger.mask.cpu()
    scale = float(d.abs().max()) or 1.0
    return (0.5 + d / (2 * scale)).clamp(0, 1)


def figure_png(trigger, images: torch.Tensor, answers_clean, answers_stamped, classes: list[str], target: int,
               n: int = 6) -> bytes:
    """PNG bytes: n clean images over the same images stamped, the amplified trigger, the suspect's answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = to_float(images[:n].cpu())
    s = trigger.cpu().stamp(x)
    n = len(x)
    fig, axes = plt.subplots(2, n + 1, figsize=(1.6 * (n + 1), 3.6))
    name = (lambda k: classes[k] if 0 <= k < len(classes) else str(k))
    for i in range(n):
        for row, (img, ans) in enumerate(((x[i], answers_clean[i]), (s[i], answers_stamped[i]))):
            ax = axes[row, i]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(name(int(ans)), fontsize=8, color="crimson" if int(ans) == target and row else "black")
            ax.axis("off")
    axes[0, n].imshow(amplified(trigger).permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[0, n].set_title("trigger (amplified)", fontsize=8)
    axes[0, n].axis("off")
    axes[1, n].axis("off")
    axes[0, 0].text(-0.15, 0.5, "clean", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.15, 0.5, "stamped", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(f"suspect's answers (target: {name(target)})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(path: str | os.PathLike, result: VerificationResult, bundle, suspect: str, images: torch.Tensor,
                 answers_clean, answers_stamped, confidence: float = 0.999) -> tuple[Path, Path]:
    """Write FILE.html and FILE.png (the figure, also embedded in the page); returns both paths."""
    path = Path(path)
    png = figure_png(bundle.trigger, images, answers_clean, answers_stamped, list(bundle.classes), bundle.target)
    png_path = path.with_suffix(".png")
    atomic_write_bytes(png_path, png)
    lo = 1 - clopper_pearson_upper(result.n - result.hits, result.n, confidence)
    hi = clopper_pearson_upper(result.hits, result.n, confidence)
    rows = [
        ("verdict", result.verdict),
        ("suspect", suspect),
        ("ASR (stamped images answered with the target)", f"{100 * result.asr:.2f}% ({result.hits} of {result.n})"),
        (f"ASR {100 * confidence:g}% confidence interval (Clopper-Pearson)", f"[{100 * lo:.2f}%, {100 * hi:.2f}%]"),
        ("null bound tau0 (H0: ASR <= tau0)", f"{100 * result.tau0:.2f}%"),
        ("p-value (exact one-sided binomial test)", "< 1e-300" if result.p_value == 0 else f"{result.p_value:.3g}"),
        ("alpha", f"{result.alpha:g}"),
        ("unstamped target rate", f"{100 * result.unstamped_rate:.2f}%"),
        ("suspect accuracy clean / stamped", "n/a" if result.clean_accuracy is None else
         f"{100 * result.clean_accuracy:.2f}% / {100 * (result.stamped_accuracy or 0):.2f}%"),
        ("queries", str(result.queries)),
        ("bundle hash", bundle.manifest.get("bundle_hash", "")),
        ("trigger commitment (made when the bundle was written)",
         f"{bundle.manifest.get('commitment', {}).get('hash', '')} ({bundle.manifest.get('commitment', {}).get('created', '')})"),
        ("trigger hash (SHA-256 of pattern and mask)", trigger_hash(bundle.trigger)),
        ("target class", f"{bundle.target} ({bundle.classes[bundle.target] if bundle.target < len(bundle.classes) else ''})"),
        ("bundle created", str(bundle.manifest.get("created", ""))),
        ("report written", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        *(("warning", w) for w in result.warnings),
    ]
    table = "\n".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(str(b))}</td></tr>" for a, b in rows)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>honeypotnet verification: {html.escape(result.verdict)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}th{{text-align:left;padding-right:1em;
vertical-align:top}}td{{font-family:monospace}}h1{{color:{'#b00' if result.stolen else '#333'}}}</style></head>
<body><h1>{html.escape(result.verdict)}</h1>
<table>{table}</table>
<p><img alt="clean and stamped images with the suspect's answers, and the trigger" style="max-width:100%"
src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>
<p>The test: the owner's held-out images outside the target class are stamped with the secret trigger and sent
to the suspect; H0 (an independently trained model) says at most tau0 of them are answered with the target
class, tau0 being calibrated on clean reference models of the unprotected victim. The suspect is flagged when
the exact binomial test rejects H0 at alpha.</p></body></html>
"""
    atomic_write_text(path, page)
    return path, png_path
