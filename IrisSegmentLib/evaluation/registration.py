"""Registration baseline: what a Slicer user does today to carry labels from one scan to another.

The reference image is registered to the target with SimpleITK and the reference labels are
warped onto the target grid with nearest neighbour. Stages, each starting from the last:

1. centred initialisation by image moments (centres of mass);
2. exhaustive translation search at a coarse level: scans with different fields of view (a head
   CT that does or does not reach the shoulders) have centres of mass several cm apart, more
   than gradient descent recovers;
3. multi-resolution affine, Mattes mutual information;
4. multi-resolution dense displacement field (``sitk.DisplacementFieldTransform``, Gaussian
   regularised total field, SyN-like but not symmetric) with ANTs neighbourhood correlation.

Reference and target come from different patients and scanners (MRI intensities are not
calibrated), which rules out demons-style intensity differences: the global stages use mutual
information, the deformable stage local correlation (SyN's metric; on Hippocampus crops it gains
about twice what mutual information does). Every metric is sampled only inside the target's
dilated Otsu foreground: in a CT that is mostly air, air-to-air matches would otherwise dominate
it and drive the affine to shrink or stretch the body. The deformable stage skips pyramid levels
above 64^3 voxels (the full-resolution level of a 128^3 CT): there local correlation costs over
a minute on two CPU cores for a gain of about 0.01 Dice. A B-spline stage was tried and dropped:
in SimpleITK's v4 framework its metric derivative costs about 1 min per iteration on 128^3 CT.

Deterministic: metric sampling uses a fixed non-zero seed (0 means "wall clock" in SimpleITK)
and a fixed thread count; the metric's per-thread partial sums depend on the thread count, so
results are reproducible for a given ``threads`` value, not across values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume

# RAS <-> LPS: flip the first two world axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Largest pyramid level (in voxels) the deformable stage runs on; see the module docstring.
_DEFORMABLE_MAX_VOXELS = 64**3


@dataclass(frozen=True)
class RegistrationSettings:
    """Knobs of the baseline; the defaults are what the benchmark reports."""

    search_steps: int = 5  # translations tried on each side of the start, per axis
    search_fraction: float = 0.3  # search half-width as a fraction of the target's extent
    affine_iterations: int = 100
    deformable_iterations: int = 50
    # Gaussian variance (in voxels^2 of each pyramid level) applied to the total displacement field.
    field_smoothing_variance: float = 1.5
    histogram_bins: int = 32
    sampling_fraction: float = 0.2
    seed: int = 42
    threads: int = 1

    def __post_init__(self) -> None:
        if self.seed <= 0:
            raise InputError("registration seed must be positive: SimpleITK reads 0 as 'seed from the clock'.")


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """Volume (i, j, k array, IJK->RAS affine) -> sitk.Image (z, y, x array, LPS geometry)."""
    matrix = _RAS_TO_LPS @ volume.affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    array = np.asarray(volume.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix / spacing).flatten().tolist())
    image.SetOrigin((_RAS_TO_LPS @ volume.affine[:3, 3]).tolist())
    return image


def sitk_to_volume(image: sitk.Image, name: str = "", segments: dict[int, dict] | None = None) -> Volume:
    """Inverse of ``volume_to_sitk``."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.GetOrigin())
    return Volume(sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine, name=name, segments=dict(segments or {}))


def _clipped(volume: Volume) -> sitk.Image:
    """Float image starting at 0 with its brightest 0.5 % of foreground clamped.

    Mattes MI bins the full intensity range: one metal artefact (20000 HU) would put air, soft
    tissue and bone into the same few bins. The percentile is taken over voxels above the image
    minimum so a CT that is mostly air keeps its bone. The shift to 0 makes the darkest voxels
    weigh nothing in the moments (centre of mass) initialisation.
    """
    array = np.asarray(volume.array, dtype=np.float32)
    low = float(array.min())
    foreground = array[array > low]
    high = float(np.percentile(foreground, 99.5)) if foreground.size else low
    return volume_to_sitk(Volume(np.clip(array, low, high) - low, volume.affine))


def _foreground_mask(image: sitk.Image) -> sitk.Image:
    """Otsu foreground grown by 3 voxels, so the body outline stays inside the metric region."""
    return sitk.BinaryDilate(sitk.OtsuThreshold(image, 0, 1), [3, 3, 3])


def _shrink_factors(image: sitk.Image) -> list[int]:
    """Pyramid levels that keep the coarsest level at least ~16 voxels along its smallest axis."""
    factors = [1]
    while min(image.GetSize()) // (factors[0] * 2) >= 16 and len(factors) < 3:
        factors.insert(0, factors[0] * 2)
    return factors


def _method(settings: RegistrationSettings, shrink: list[int], mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.seed)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([f / 2.0 for f in shrink])  # in voxels of the full-resolution grid
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetNumberOfThreads(settings.threads)
    return method


def _optimize(method: sitk.ImageRegistrationMethod, transform: sitk.Transform, fixed: sitk.Image, moving: sitk.Image) -> None:
    """Run `method` from `transform`, which it optimizes in place (so `transform` holds the result)."""
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)


def _initial_translation(
    fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, settings: RegistrationSettings
) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform(
        sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    )
    if settings.search_steps > 0:
        extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
        step_mm = settings.search_fraction * extent / settings.search_steps
        method = _method(settings, [_shrink_factors(fixed)[0]], mask)
        method.SetOptimizerAsExhaustive([0, 0, 0] + [settings.search_steps] * 3, stepLength=1.0)
        method.SetOptimizerScales([1.0, 1.0, 1.0] + step_mm.tolist())  # rotations stay at 0
        _optimize(method, transform, fixed, moving)
    return transform


def _register_affine(
    fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, start: sitk.Euler3DTransform, settings: RegistrationSettings
) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetCenter(start.GetCenter())
    affine.SetMatrix(start.GetMatrix())
    affine.SetTranslation(start.GetTranslation())
    method = _method(settings, _shrink_factors(fixed), mask)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=settings.affine_iterations, relaxationFactor=0.5
    )
    # Scales from a 1 mm shift make rotations/scalings and translations move points comparably.
    method.SetOptimizerScalesFromPhysicalShift()
    _optimize(method, affine, fixed, moving)
    return affine


def _register_deformable(
    fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, affine: sitk.Transform, settings: RegistrationSettings
) -> sitk.Transform:
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)
    displacement = sitk.DisplacementFieldTransform(field)
    displacement.SetSmoothingGaussianOnUpdate(varianceForUpdateField=0.0, varianceForTotalField=settings.field_smoothing_variance)
    voxels = int(np.prod(fixed.GetSize()))
    shrink = [f for f in _shrink_factors(fixed) if voxels / f**3 <= _DEFORMABLE_MAX_VOXELS] or [_shrink_factors(fixed)[0]]
    method = _method(settings, shrink, mask)
    method.SetMetricAsANTSNeighborhoodCorrelation(radius=2)
    method.SetMetricSamplingStrategy(method.NONE)  # every voxel drives its own displacement
    method.MetricUseFixedImageGradientFilterOff()
    method.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=settings.deformable_iterations, estimateLearningRate=method.EachIteration
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetMovingInitialTransform(affine)
    _optimize(method, displacement, fixed, moving)
    # Composite transforms apply the last added first: fixed point -> displacement -> affine -> moving point.
    return sitk.CompositeTransform([affine, displacement])


def register_and_warp(
    reference_image: Volume,
    reference_labels: Volume,
    target_image: Volume,
    settings: RegistrationSettings | None = None,
) -> tuple[Volume, float]:
    """Register the reference to the target and warp the reference labels onto the target grid.

    Returns the warped label map (label values and segment metadata of the reference) and the
    wall-clock seconds of the whole job, conversions and warping included, for the speed comparison.
    """
    settings = settings or RegistrationSettings()
    reference_labels.check_label_map()
    reference_labels.check_matches(reference_image)
    reference_image.check_finite()
    target_image.check_finite()
    if min(target_image.shape) < 4 or min(reference_image.shape) < 4:
        raise InputError("registration needs at least 4 voxels along every axis of the reference and the target.")

    start = time.perf_counter()
    fixed = _clipped(target_image)
    moving = _clipped(reference_image)
    mask = _foreground_mask(fixed)
    try:
        translation = _initial_translation(fixed, moving, mask, settings)
        affine = _register_affine(fixed, moving, mask, translation, settings)
        transform = _register_deformable(fixed, moving, mask, affine, settings)
    except RuntimeError as exc:  # ITK stops when too few samples overlap (blank image, no common field of view)
        raise InputError(
            f"registering {reference_image.name or 'the reference'} to {target_image.name or 'the target'} failed: "
            f"{str(exc).strip().splitlines()[-1]} Check that both images show the same anatomy and are not blank."
        ) from exc

    labels = volume_to_sitk(reference_labels)
    warped = sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    result = sitk_to_volume(warped, name=f"{reference_labels.name or 'labels'} (registered)", segments=reference_labels.segments)
    result.affine = target_image.affine.copy()  # exactly the target grid, free of float round trips
    return result, time.perf_counter() - start
