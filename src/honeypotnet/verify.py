"""Ownership verification and the calibration of its null hypothesis (docs/verification.md).

Stamp the owner's held-out images (target class excluded) with the secret trigger, query the
suspect, and count answers equal to the target class. H0 is "an independently trained model":
such models answer y_t to a UAP trigger more often than to clean images, so the paired test
against the suspect's own unstamped rate would accuse innocent models. Instead τ0 is an upper
bound on the ASR of independently trained *reference* models (clean substitutes of the
unprotected victim, of other architectures), and the test is the one-sided exact binomial test
of H0: ASR ≤ τ0 at level α. The paired sign test on the same images, stamped vs not, must also show
that the trigger is what adds the target answers (stolen_verdict), so a model answering the target to
everything is not flagged.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binom
from torch import nn

from .attacks import query_oracle, train_substitute
from .countermeasures import finetune
from .oracles import ModelOracle, Oracle
from .purify import PurifiedModel
from .ops import to_float
from .training import FitConfig, accuracy, predict_logits
from .trigger import Trigger


def clopper_pearson_upper(hits: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound for a binomial proportion."""
    if hits >= n:
        return 1.0
    return float(beta_dist.ppf(confidence, hits + 1, n - hits))


def clopper_pearson_lower(hits: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound for a binomial proportion."""
    if hits <= 0:
        return 0.0
    return float(beta_dist.ppf(1 - confidence, hits, n - hits + 1))


def paired_p_value(gained: int, lost: int) -> float:
    """The exact one-sided sign test that the trigger *adds* target answers: of the images whose answer is the
    target with the trigger or without it but not both, `gained` are target only when stamped and `lost` only
    when clean; p = P(X >= gained) for X ~ Binomial(gained + lost, 1/2) (1 when no image changed)."""
    n = gained + lost
    return 1.0 if n == 0 or gained == 0 else float(binom.sf(gained - 1, n, 0.5))


def stolen_verdict(p_value: float, paired_p_value: float | None, alpha: float) -> bool:
    """The verdict: the ASR is above what innocent models reach (p_value, H0: ASR <= tau0) AND stamping is what
    adds the target answers (paired_p_value; None where the suspect's unstamped answers were not asked), each
    at level alpha. A suspect answering the target as often without the trigger (a broken or target-biased
    model) is no evidence of the trigger."""
    return p_value < alpha and (paired_p_value is None or paired_p_value < alpha)


def binomial_p_value(hits: int, n: int, tau0: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, tau0): the exact one-sided p-value of H0: ASR <= tau0."""
    if hits <= 0:
        return 1.0
    return float(binom.sf(hits - 1, n, tau0))


@dataclass
class Calibration:
    """How τ0 was obtained: reference models' ASR, its bound, and the rule."""

    tau0: float
    reference: list[dict] = field(default_factory=list)  # [{"arch", "asr", "upper", "n"}]
    rule: str = ""


TAU0_CAP = 0.5  # calibrate_tau0's default cap


def calibrate_tau0(
    reference_models: list[tuple[str, nn.Module]],
    trigger: Trigger,
    images: torch.Tensor,
    labels: torch.Tensor,
    target: int,
    *,
    confidence: float = 0.999,
    factor: float = 2.0,
    floor: float = 0.05,
    cap: float = TAU0_CAP,
) -> Calibration:
    """τ0 = min(cap, max(floor, factor · max_r UCB_r)), UCB_r the Clopper–Pearson upper bound (at
    `confidence`) of reference model r's ASR on the stamped non-target images. The factor gives
    headroom for architectures and training runs the references do not cover."""
    refs = []
    for name, model in reference_models:
        hits, n, _ = _count_hits(ModelOracle(model), trigger, images, labels, target)
        refs.append({"arch": name, "asr": hits / n, "upper": clopper_pearson_upper(hits, n, confidence), "n": n})
    worst = max((r["upper"] for r in refs), default=0.0)
    tau0 = min(cap, max(floor, factor * worst))
    rule = f"tau0 = min({cap}, max({floor}, {factor} x max Clopper-Pearson {confidence} upper bound over {len(refs)} reference models))"
    return Calibration(tau0, refs, rule)


def train_reference_models(victim: nn.Module, query_images: torch.Tensor, archs: list[str], num_classes: int,
                           fit_config: FitConfig | None = None, progress: bool = False,
                           device=None) -> list[tuple[str, nn.Module]]:
    """Clean substitutes of the *unprotected* victim (what an innocent thief-free model looks like
    to the verifier): one per architecture, trained on the victim's soft answers to `query_images`.
    device: where the substitutes train (default: the victim's device, which answers the queries)."""
    answers = query_oracle(ModelOracle(victim), query_images, batch_size=500)
    device = device or next(victim.parameters()).device
    out = []
    for i, arch in enumerate(archs):
        cfg = fit_config or FitConfig(epochs=10, seed=1000 + i)
        out.append((arch, train_substitute(arch, num_classes, query_images, answers, cfg, progress=progress,
                                           device=device)))
    return out


# what a suspect may have done to an innocent copy: (epochs, lr) of fine-tuning on clean labels
FINETUNE_SETTINGS = ((3, 0.01), (10, 0.01), (3, 0.05), (10, 0.05))


def finetuned_references(reference_models: list[tuple[str, nn.Module]], images: torch.Tensor, labels: torch.Tensor,
                         settings=FINETUNE_SETTINGS, seed: int = 0) -> list[tuple[str, nn.Module]]:
    """Each reference model fine-tuned (all layers) on clean labelled images under each (epochs, lr).

    An innocent model that was fine-tuned on a few clean labels can answer a UAP trigger's target
    more often than the references it came from (bench/robustness.py measured a clean extracted CNN
    going from 6.0% to 12.5-17.1% ASR on a trigger whose tau0 was 10.8%, so verification flagged it).
    Passing these models to calibrate_tau0 together with the references widens the null towards
    that case. Measured there, it raised tau0 a little but did not clear those false positives:
    the fine-tuned references stayed far below the clean *extracted* copies that were flagged.
    `images`/`labels`: the owner's labelled images (uint8 (N,3,H,W), int64 (N,))."""
    out = []
    for name, model in reference_models:
        for epochs, lr in settings:
            out.append((f"{name}+finetune-e{epochs}-lr{lr:g}", finetune(model, images, labels, epochs, lr, seed=seed)))
    return out


# what a suspect may do to every input before its model sees it: purify.purify settings
# (JPEG re-compression, Gaussian blur), the thief sweep's purifications (bench/robustness.py)
PURIFY_SETTINGS = (("jpeg-q75", {"method": "jpeg", "quality": 75}), ("jpeg-q50", {"method": "jpeg", "quality": 50}),
                   ("blur-0.5", {"method": "blur", "sigma": 0.5}), ("blur-1.0", {"method": "blur", "sigma": 1.0}))
# a purification that costs a model more than this much clean accuracy is a deployment no one would serve
# (blur σ 1 costs a CIFAR CNN about 34 of its 60 points; JPEG q50 and blur σ 0.5 about 10): left out of the
# null by purified_references, and not a goal for the thief in bench/robustness.py
PURIFY_MAX_DROP = 0.20


def purified_references(reference_models: list[tuple[str, nn.Module]], settings=PURIFY_SETTINGS, *,
                        images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                        max_drop: float = PURIFY_MAX_DROP) -> list[tuple[str, nn.Module]]:
    """Each reference model behind each input purification (purify.PurifiedModel; the
    weights are shared, nothing is trained): innocent models whose owners blur or re-compress
    every input, as a thief may.

    The owner does not see what a suspect does to its inputs, and an innocent model behind a blur
    can answer the trigger's target more often than the same model without it: bench/robustness.py
    measured clean extracted copies behind a Gaussian blur (σ 1) answering a blur-robust trigger
    (trigger_blur 0.75) 6.7% and 8.6% of the time against tau0 5.0%, so verification flagged them.
    Passing these models to calibrate_tau0 with the references puts that case in the null.

    images/labels (labelled clean images): a wrapper whose accuracy is more than `max_drop` below
    its reference's is left out, as a deployment no owner would serve (PURIFY_MAX_DROP, the same rule
    as bench/robustness.py's usable purifications). Without them every wrapper is kept. settings: (name, purify kwargs) pairs."""
    if (images is None) != (labels is None):
        raise ValueError("purified_references: give both images and labels (or neither)")
    if not 0 <= max_drop <= 1:
        raise ValueError(f"max_drop must be in [0, 1], got {max_drop}")
    out = []
    for name, model in reference_models:
        base = None if images is None else accuracy(model, images, labels)
        for label, spec in settings:
            wrapped = PurifiedModel(model, **spec)
            if base is None or base - accuracy(wrapped, images, labels) <= max_drop:
                out.append((f"{name}+{label}", wrapped))
    return out


def calibrate_null(victim: nn.Module, trigger: Trigger, query_images: torch.Tensor, images: torch.Tensor,
                   labels: torch.Tensor, target: int, *, archs=("cnn", "resnet20"), num_classes: int | None = None,
                   fit_config: FitConfig | None = None, finetune_images: int = 0, purify=(),
                   purify_max_drop: float = PURIFY_MAX_DROP, seed: int = 0, progress: bool = False,
                   device=None, **calibration) -> Calibration:
    """The verification null in one call (what `protect --references`, the demo and the benchmarks use):
    clean reference models of the *unprotected* victim (one per arch, trained on its soft answers to
    `query_images`), optionally widened by their copies fine-tuned on `finetune_images` of the labelled
    owner images (finetuned_references) and by each behind the `purify` settings (purified_references,
    names or (name, spec) pairs of PURIFY_SETTINGS); then tau0 from calibrate_tau0 on `images`/`labels`
    (held-out labelled owner images). `calibration`: calibrate_tau0's keyword options."""
    table = dict(PURIFY_SETTINGS)
    settings = []
    for item in purify:
        name, spec = (item, table.get(item)) if isinstance(item, str) else item
        if spec is None:
            raise ValueError(f"unknown purification {name!r}; known: {', '.join(table)}")
        settings.append((name, spec))
    k = num_classes or int(predict_logits(victim, images[:1]).shape[1])
    refs = train_reference_models(victim, query_images, list(archs), k, fit_config, progress=progress, device=device)
    if finetune_images:  # innocent copies fine-tuned on clean labels
        n = min(int(finetune_images), len(images))
        refs = refs + finetuned_references(refs, images[:n], labels[:n].long(), seed=seed)
    if settings:  # ... and every one of them behind each input purification a suspect may apply
        refs = refs + purified_references(refs, settings, images=images, labels=labels.long(), max_drop=purify_max_drop)
    return calibrate_tau0(refs, trigger, images, labels, target, **calibration)


@dataclass
class VerificationResult:
    n: int  # stamped images queried (target class excluded)
    hits: int  # answers equal to the target class
    asr: float  # hits / n
    unstamped_rate: float  # share of target answers on the same images without the trigger
    tau0: float  # H0: ASR <= tau0
    p_value: float
    alpha: float
    stolen: bool  # verdict: H0 rejected at alpha
    target: int
    clean_accuracy: float | None = None  # suspect's accuracy on the unstamped images
    stamped_accuracy: float | None = None  # ... and on the stamped ones (functionality disruption)
    queries: int = 0
    warnings: list[str] = field(default_factory=list)  # what weakens this verdict (a null at its cap, a useless suspect)
    sequential: dict | None = None  # the sequential test's record (verify(..., sequential=True))
    paired_p_value: float | None = None  # sign test that stamping adds target answers (paired_p_value); None if not run

    @property
    def verdict(self) -> str:
        return "STOLEN (backdoor present)" if self.stolen else "not flagged"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        rows = [
            ("images (non-target)", f"{self.n}"),
            ("ASR (stamped -> target)", f"{100 * self.asr:.2f}%  ({self.hits}/{self.n})"),
            *([("unstamped target rate", f"{100 * self.unstamped_rate:.2f}%")] if self.unstamped_rate == self.unstamped_rate
              else []),
            ("null bound tau0", f"{100 * self.tau0:.2f}%"),
            ("p-value (H0: ASR <= tau0)", "< 1e-300" if self.p_value == 0 else f"{self.p_value:.3g}"),
            ("alpha", f"{self.alpha:g}"),
        ]
        if self.paired_p_value is not None:
            rows.append(("p-value (trigger adds target)", "< 1e-300" if self.paired_p_value == 0 else f"{self.paired_p_value:.3g}"))
        if self.clean_accuracy is not None:
            rows.append(("accuracy clean / stamped", f"{100 * self.clean_accuracy:.2f}% / {100 * (self.stamped_accuracy or 0):.2f}%"))
        if self.sequential:
            why = (f" (ASR shown below {self.sequential['stolen_asr']:.0%}, what stolen copies reach)"
                   if self.sequential["decided"] == "cleared" else "")
            rows.append(("sequential test", f"{self.sequential['decided']} after {self.sequential['stamped_queries']} "
                                            f"stamped queries (of at most {self.sequential['max_queries']}){why}"))
        rows.append(("verdict", self.verdict))
        rows += [("warning", w) for w in self.warnings]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def _count_hits(oracle: Oracle, trigger: Trigger, images: torch.Tensor, labels: torch.Tensor | None, target: int,
                batch_size: int = 500) -> tuple[int, int, dict]:
    """Query stamped and unstamped non-target images; return (hits, n, extra figures)."""
    if labels is not None:
        keep = labels != target
        images, labels = images[keep], labels[keep]
    if len(images) == 0:
        raise ValueError("no verification images outside the target class")
    trigger = trigger.cpu()
    stamped_pred, clean_pred = [], []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size])
        clean_pred.append(oracle(x).argmax(1))
        stamped_pred.append(oracle(trigger.stamp(x)).argmax(1))
    sp, cp = torch.cat(stamped_pred), torch.cat(clean_pred)
    extra = {"unstamped_rate": float((cp == target).float().mean()),
             "paired_p_value": paired_p_value(int(((sp == target) & (cp != target)).sum()),
                                              int(((cp == target) & (sp != target)).sum()))}
    if labels is not None:
        extra["clean_accuracy"] = float((cp == labels).float().mean())
        extra["stamped_accuracy"] = float((sp == labels).float().mean())
    return int((sp == target).sum()), len(sp), extra


class EstimatorOracle(Oracle):
    """Any object with ART's classifier interface (`predict(x: np.ndarray (N,3,H,W) float32) -> (N,K)`): an
    Adversarial Robustness Toolbox estimator, or a user's own wrapper of a remote API."""

    def __init__(self, estimator) -> None:
        super().__init__()
        self.estimator = estimator

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(self.estimator.predict(x.detach().cpu().numpy().astype("float32")), dtype=torch.float32)
        if out.ndim != 2 or len(out) != len(x) or not torch.isfinite(out).all():
            raise ValueError(f"the estimator's predict returned {tuple(out.shape)} for {len(x)} images (or NaN/inf)")
        return out


def as_oracle(suspect) -> Oracle:
    """An Oracle for a suspect: an Oracle (local, HTTP, defended), an nn.Module, or an ART-style estimator."""
    if isinstance(suspect, Oracle):
        return suspect
    if isinstance(suspect, nn.Module):
        return ModelOracle(suspect)
    if callable(getattr(suspect, "predict", None)):
        return EstimatorOracle(suspect)
    raise TypeError(f"cannot query a suspect of type {type(suspect).__name__}: pass an nn.Module, an Oracle, or an "
                    "estimator with predict(x) (e.g. an ART classifier)")


def verify(suspect, trigger: Trigger, images: torch.Tensor, labels: torch.Tensor | None, target: int, tau0: float,
           alpha: float = 1e-3, *, sequential: bool = False, max_queries: int | None = None,
           batch_size: int = 10, stolen_asr: float | None = None, unstamped: bool = False) -> VerificationResult:
    """Ownership test of a suspect (an nn.Module, an Oracle such as an HTTP endpoint, or an ART estimator).

    images: the owner's held-out images (uint8/float (N,3,H,W)); labels (N,) to exclude the target
    class and report accuracy on clean vs stamped inputs (pass None for unlabeled images).
    sequential: query stamped images `batch_size` at a time and stop as soon as the verdict is decided
    (sequential_test; at most `max_queries` stamped images); unstamped queries only with `unstamped`."""
    if not 0 < tau0 < 1:
        raise ValueError(f"tau0 must be in (0, 1), got {tau0}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    oracle = as_oracle(suspect)
    if sequential:
        return sequential_verify(oracle, trigger, images, labels, target, tau0, alpha, max_queries=max_queries,
                                 batch_size=batch_size, stolen_asr=stolen_asr, unstamped=unstamped)
    before = oracle.queries
    hits, n, extra = _count_hits(oracle, trigger, images, labels, target)
    p = binomial_p_value(hits, n, tau0)
    # stolen: the ASR is above what innocent models reach (tau0) AND the trigger is what raises it; a suspect
    # that answers the target to clean images as often (a broken or target-biased model) is not evidence
    res = VerificationResult(n=n, hits=hits, asr=hits / n, tau0=tau0, p_value=p, alpha=alpha,
                             stolen=stolen_verdict(p, extra["paired_p_value"], alpha), target=target,
                             queries=oracle.queries - before, **extra)
    if p < alpha and not res.stolen:
        res.warnings.append(f"not flagged although the ASR is above tau0: the suspect answers the target to "
                            f"{res.unstamped_rate:.1%} of the images without the trigger too, so stamping does not "
                            f"add target answers significantly (paired p {res.paired_p_value:.3g})")
    _warn(res, labels)
    return res


def _warn(res: VerificationResult, labels: torch.Tensor | None) -> None:
    tau0 = res.tau0
    if tau0 >= TAU0_CAP:
        res.warnings.append(f"tau0 is at its cap ({TAU0_CAP:.0%}): innocent reference models answer this trigger "
                            "often, so the test can only flag suspects that obey it most of the time")
    if labels is not None and res.clean_accuracy is not None:
        k = int(labels.max()) + 1 if len(labels) else 0
        chance = 1 / max(k, 1)
        if k > 1 and res.clean_accuracy < 2 * chance:
            res.warnings.append(f"the suspect's clean accuracy {res.clean_accuracy:.1%} is near chance ({chance:.1%}): "
                                "is it a model of this task, and are the images in its input format?")


# ----------------------------------------------------------------------------- the sequential test


def log_evidence_stolen(hits: int, n: int, tau0: float) -> float:
    """log M_n of the test martingale against H0: ASR <= tau0 after `hits` of `n` stamped queries (numbers, or
    numpy arrays of them).

    M_n = mean over p ~ Uniform(tau0, 1) of prod_i Bernoulli(x_i; p) / Bernoulli(x_i; tau0) (Robbins' mixture of
    likelihood ratios). Under any ASR <= tau0 each ratio has expectation <= 1, so M is a nonnegative
    supermartingale with M_0 = 1 and, by Ville's inequality, P(ever M_n >= 1/alpha) <= alpha: stopping whenever
    it crosses is always valid, whatever the stopping rule."""
    import numpy as np
    from scipy.special import betaln

    hits, n = np.asarray(hits, dtype=float), np.asarray(n, dtype=float)
    tail = beta_dist.logsf(tau0, hits + 1, n - hits + 1)  # log P(p > tau0) under Beta(hits+1, n-hits+1)
    out = (betaln(hits + 1, n - hits + 1) + tail - math.log1p(-tau0)
           - hits * math.log(tau0) - (n - hits) * math.log1p(-tau0))
    out = np.where(n == 0, 0.0, out)  # M_0 = 1
    return float(out) if out.ndim == 0 else out


def log_evidence_innocent(hits: int, n: int, stolen_asr: float) -> float:
    """log M'_n against H0': ASR >= stolen_asr (the suspect answers the trigger like a stolen copy): the mirror
    image of log_evidence_stolen (a mixture over p ~ Uniform(0, stolen_asr)); crossing 1/alpha clears it."""
    return log_evidence_stolen(n - hits, n, 1 - stolen_asr)


def default_stolen_asr(tau0: float) -> float:
    """The ASR stolen copies show at least, which the sequential test clears against: 0.5, or halfway
    between a tau0 above it and 1."""
    return 0.5 if tau0 < 0.5 else (1 + tau0) / 2


def sequential_decision(hits: int, n: int, tau0: float, stolen_asr: float, alpha: float) -> str | None:
    """The sequential test's verdict after `hits` target answers out of `n` stamped queries: "stolen" once
    H0 "ASR <= tau0" is rejected at alpha, else "cleared" once H0' "ASR >= stolen_asr" is, else None (go on)."""
    threshold = math.log(1 / alpha)
    if log_evidence_stolen(hits, n, tau0) >= threshold:
        return "stolen"
    if log_evidence_innocent(hits, n, stolen_asr) >= threshold:
        return "cleared"
    return None


def sequential_verify(oracle: Oracle, trigger: Trigger, images: torch.Tensor, labels: torch.Tensor | None,
                      target: int, tau0: float, alpha: float = 1e-6, *, max_queries: int | None = None,
                      batch_size: int = 10, stolen_asr: float | None = None, unstamped: bool = False) -> VerificationResult:
    """The ownership test in as few queries as it takes: stamped images are sent `batch_size` at a time, and
    after each batch two always-valid tests are checked (mixture likelihood-ratio martingales, Ville's
    inequality): flagged STOLEN once H0 "ASR <= tau0" is rejected at alpha, cleared once H0' "ASR >=
    stolen_asr" (default 0.5, or halfway between a tau0 above it and 1) is rejected at alpha (a suspect that
    obeys the trigger less than stolen copies do); neither
    by max_queries (or the images' end): not flagged, undecided. The error guarantee holds at every stopping
    time, so peeking after each batch costs nothing. p_value reports 1/M (an always-valid p-value)."""
    if stolen_asr is None:
        stolen_asr = default_stolen_asr(tau0)
    if not 0 < stolen_asr < 1 or stolen_asr <= tau0:
        raise ValueError(f"stolen_asr must be in (tau0, 1), got {stolen_asr}")
    if batch_size < 1 or (max_queries is not None and max_queries < 1):
        raise ValueError("batch_size and max_queries must be >= 1")
    if labels is not None:
        keep = labels != target
        images, labels = images[keep], labels[keep]
    if len(images) == 0:
        raise ValueError("no verification images outside the target class")
    limit = min(len(images), max_queries or len(images))
    trigger = trigger.cpu()
    before = oracle.queries
    hits = n = 0
    clean_pred, stamped_pred = [], []
    decided = None
    while n < limit and decided is None:
        x = to_float(images[n : min(n + batch_size, limit)])
        pred = oracle(trigger.stamp(x)).argmax(1)
        stamped_pred.append(pred)
        if unstamped:
            clean_pred.append(oracle(x).argmax(1))
        hits += int((pred == target).sum())
        n += len(x)
        decided = sequential_decision(hits, n, tau0, stolen_asr, alpha)
    log_m = log_evidence_stolen(hits, n, tau0)
    extra = {"unstamped_rate": float("nan")}
    if unstamped:
        cp, sp = torch.cat(clean_pred), torch.cat(stamped_pred)
        extra["unstamped_rate"] = float((cp == target).float().mean())
        if labels is not None:
            extra["clean_accuracy"] = float((cp == labels[:n]).float().mean())
            extra["stamped_accuracy"] = float((sp == labels[:n]).float().mean())
    res = VerificationResult(n=n, hits=hits, asr=hits / n, tau0=tau0, p_value=min(1.0, math.exp(-log_m)), alpha=alpha,
                             stolen=decided == "stolen", target=target, queries=oracle.queries - before, **extra)
    res.sequential = {"decided": decided or "undecided", "stamped_queries": n, "max_queries": limit,
                      "batch_size": batch_size, "stolen_asr": stolen_asr,
                      "log_evidence_stolen": log_m, "log_evidence_innocent": log_evidence_innocent(hits, n, stolen_asr),
                      "test": "mixture likelihood-ratio test martingales (Ville's inequality), always valid"}
    if decided is None:
        res.warnings.append(f"undecided after {n} stamped queries: neither test reached 1/alpha (raise --max-queries)")
    _warn(res, labels)
    return res


def assess(model: nn.Module, trigger, images: torch.Tensor, labels: torch.Tensor, target: int, tau0: float, *,
           alpha: float = 1e-3, cta_images: torch.Tensor | None = None, cta_labels: torch.Tensor | None = None,
           purification: dict | None = None) -> dict:
    """CTA, ASR and the verdict of `model` (optionally wrapped in PurifiedModel(**purification)).

    images/labels: the owner's verification images (stamped with `trigger`, target class excluded, by
    verify()); cta_images/cta_labels: where clean accuracy is measured (default the same images)."""
    suspect = PurifiedModel(model, **purification) if purification else model
    v = verify(suspect, trigger, images, labels, target, tau0, alpha)
    ci, cl = (images, labels) if cta_images is None else (cta_images, cta_labels)
    return {"cta": accuracy(suspect, ci, cl), "asr": v.asr, "hits": v.hits, "n": v.n, "unstamped_rate": v.unstamped_rate,
            "p_value": v.p_value, "paired_p_value": v.paired_p_value, "tau0": v.tau0, "alpha": v.alpha, "stolen": v.stolen,
            "verdict": v.verdict,
            "clean_accuracy": v.clean_accuracy, "stamped_accuracy": v.stamped_accuracy}
