"""Quality of a compressed embedded-digits model against its teacher (see DESIGN.md, "how quality is
measured here"): fidelity (PSNR of samples from the same noise), task quality (class accuracy and a
Frechet distance in the classifier's feature space), and cost (CPU latency per sampling step in the GEMM mode
the student's quantized linears run now, `latency_gemm_mode`: DICOMPRESS_GEMM_MODE with auto resolved; for a
student with 8-bit activation codes measured in decode, also forced into GEMM mode int8, kernels/int8_mm.py)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..kernels import current_mode, gemm_mode
from ..kernels.dispatch import INT8_MODES
from ..kernels.int8_mm import int8_gemm_layers
from ..zoo import load_classifier, load_conditioning
from ..zoo.digits import load_digits_tensors
from ..zoo.sampler import DEFAULT_STEPS, sample
from .footprint import is_packed
from .latency import latency_ms_per_step
from .metrics import class_accuracy, frechet_distance, psnr_db, sqnr_db

BATCH = 100


def eval_plan(num_classes: int, samples_per_class: int, seed_base: int) -> tuple[torch.Tensor, list[int]]:
    """(labels, seeds): classes in blocks of `samples_per_class`, seed `seed_base + i` for sample i."""
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    return labels, [seed_base + i for i in range(len(labels))]


def sample_batches(transformer, conditioning, labels, seeds, steps: int, desc: str, progress: bool) -> torch.Tensor:
    """`sample` in chunks of BATCH, with one tqdm tick per chunk."""
    outs = []
    for i in tqdm(range(0, len(seeds), BATCH), desc=desc, disable=not progress, leave=False):
        outs.append(sample(transformer, conditioning, labels[i:i + BATCH], seeds[i:i + BATCH], steps=steps,
                           batch_size=BATCH))
    return torch.cat(outs)


@torch.no_grad()
def _scores(classifier, images: torch.Tensor, labels: torch.Tensor, real_feats: torch.Tensor) -> tuple[float, float]:
    feats = classifier.features(images)
    return class_accuracy(classifier.head(feats), labels), frechet_distance(feats, real_feats)


@torch.no_grad()
def evaluate_digits(student, teacher, zoo_dir, samples_per_class: int = 20, steps: int = DEFAULT_STEPS,
                    seed_base: int = 1000, progress: bool = True,
                    teacher_samples: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Sample student and teacher from the same noise and classes and score both.

    `teacher_samples` (the `images["teacher"]` of an earlier call with the same plan) skips
    re-sampling the teacher when many students are compared. Returns (metrics, images) where images
    holds "teacher", "student" [N, 1, 16, 16] and "labels" [N].
    """
    conditioning = load_conditioning(zoo_dir)
    classifier = load_classifier(zoo_dir)
    labels, seeds = eval_plan(conditioning.prompt_embeds.shape[0], samples_per_class, seed_base)

    if teacher_samples is None:
        teacher_samples = sample_batches(teacher, conditioning, labels, seeds, steps, "sampling teacher", progress)
    elif len(teacher_samples) != len(seeds):
        raise ValueError(f"teacher_samples has {teacher_samples.shape[0]} samples, the plan needs {len(seeds)}: "
                         "pass the teacher images from a call with the same samples_per_class")
    student_samples = sample_batches(student, conditioning, labels, seeds, steps, "sampling student", progress)

    real_feats = classifier.features(load_digits_tensors("all")[0])
    acc_s, fd_s = _scores(classifier, student_samples, labels, real_feats)
    acc_t, fd_t = _scores(classifier, teacher_samples, labels, real_feats)
    metrics = {
        "psnr_db": psnr_db(student_samples, teacher_samples),
        "class_acc": acc_s, "class_acc_teacher": acc_t,
        "frechet": fd_s, "frechet_teacher": fd_t,
        **latency_metrics(student, teacher, conditioning),
        "samples": len(seeds), "steps": steps,
    }
    return metrics, {"teacher": teacher_samples, "student": student_samples, "labels": labels}


def measured_gemm_mode(model) -> str | None:
    """The concrete GEMM mode `model`'s quantized linears run now on its device (auto resolved): the mode of
    its int8-GEMM layers (8-bit activation codes, per-channel) where it has some, else of its other quantized
    linears; None without quantized linears (no GEMM mode to name)."""
    quantized = [m for m in model.modules() if getattr(m, "codec", None) is not None]
    if not quantized:
        return None
    return current_mode(quantized[0].qweight.device, int8_gemm=int8_gemm_layers(model) > 0)


def latency_metrics(student, teacher, conditioning) -> dict:
    """ms per sampling step of both models, with the GEMM mode the student's was measured in; a student with
    8-bit activation codes measured in decode is measured again forced into int8 (on CPU the int8 GEMM, which
    auto takes only where it is faster: both numbers side by side show what the choice was worth here)."""
    mode = measured_gemm_mode(student)
    lat_s = latency_ms_per_step(student, conditioning)
    lat_t = latency_ms_per_step(teacher, conditioning)
    out = {"latency_ms_per_step": lat_s, "latency_ms_per_step_teacher": lat_t, "latency_ratio": lat_s / lat_t}
    if mode is not None:
        out["latency_gemm_mode"] = mode
    if int8_gemm_layers(student) and mode not in INT8_MODES:
        with gemm_mode("int8"):
            out["latency_ms_per_step_int8"] = latency_ms_per_step(student, conditioning)
    return out


@torch.no_grad()
def layer_sqnr_table(student, teacher) -> list[dict]:
    """Weight SQNR of every packed module with `dequantize()` in `student` against the teacher's `weight` at
    the same name. Modules whose teacher counterpart is missing or shaped differently get SQNR None."""
    teacher_modules = dict(teacher.named_modules())
    rows = []
    for name, m in student.named_modules():
        # is_packed too: diffusers' ModelMixin has its own dequantize(), which is not a weight decoder
        if not (is_packed(m) and callable(getattr(m, "dequantize", None))):
            continue
        w_hat = m.dequantize().float()
        ref = getattr(teacher_modules.get(name), "weight", None)
        act = getattr(m, "act", None)
        # a smoothed / rotated layer stores its weight in another basis (and a folded smoothing factor
        # lives upstream): the quantization pass's own SQNR, measured in that basis, is the one to read
        transformed = act is not None and (act.has_smooth or act.rotation_kind is not None)
        ok = isinstance(ref, torch.Tensor) and ref.shape == w_hat.shape and not transformed
        rows.append({"module": name, "shape": list(w_hat.shape), "bits": getattr(m, "bits", None),
                     "codec": getattr(m, "codec", None), "group_size": getattr(m, "group_size", None),
                     "sqnr_db": sqnr_db(ref.float(), w_hat) if ok else None})
    return rows
