"""Registration baseline: what a Slicer user does today to carry labels from one scan to another.

The reference image is registered to the target with SimpleITK (centred moments initialisation,
multi-resolution affine with Mattes mutual information, then a multi-resolution B-spline with
the same metric), and the reference labels are warped onto the target grid with nearest
neighbour. Mutual information is used at both stages because reference and target come from
different patients and scanners (MRI intensities are not calibrated), which rules out the
intensity-difference metrics that demons registration needs.

Deterministic: metric sampling uses fixed seeds and a fixed thread count (the per-thread
partial sums of the metric depend on the number of threads, so results are reproducible for a
given ``threads`` value, not across values).
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


@dataclass(frozen=True)
class RegistrationSettings:
    """Knobs of the baseline; the defaults are what the benchmark reports."""

    affine_iterations: int = 200
    bspline_iterations: int = 50
    # B-spline control grid spacing in mm: coarse enough to stay smooth on 5 mm CT voxels.
    bspline_grid_mm: float = 40.0
    histogram_bins: int = 32
    sampling_fraction: float = 0.2
    seed: int = 42
    threads: int = 1


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """Volume (i, j, k array, IJK->RAS affine) -> sitk.Image (z, y, x array, LPS geometry)."""
    matrix = _RAS_TO_LPS @ volume.affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)))
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


def _shrink_factors(image: sitk.Image) -> list[int]:
    """Pyramid levels that keep the coarsest level at least ~16 voxels along its smallest axis."""
    factors = [1]
    while min(image.GetSize()) // (factors[0] * 2) >= 16 and len(factors) < 3:
        factors.insert(0, factors[0] * 2)
    return factors


def _method(settings: RegistrationSettings, shrink: list[int]) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([f / 2.0 for f in shrink])  # in voxels of the full-resolution grid
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetNumberOfThreads(settings.threads)
    return method


def _register_affine(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
    shrink = _shrink_factors(fixed)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = _method(settings, shrink)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=settings.affine_iterations, relaxationFactor=0.5
    )
    # Scales from a 1 mm shift make rotations/scalings and translations move points comparably.
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def _register_bspline(
    fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, settings: RegistrationSettings
) -> sitk.Transform:
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    shrink = _shrink_factors(fixed)
    # Mesh doubles at each finer level; the finest level reaches the requested grid spacing.
    finest_mesh = np.maximum(1, np.round(extent / settings.bspline_grid_mm)).astype(int)
    coarse_mesh = np.maximum(1, finest_mesh // 2 ** (len(shrink) - 1))
    bspline = sitk.BSplineTransformInitializer(fixed, [int(m) for m in coarse_mesh], order=3)
    method = _method(settings, shrink)
    # Line-search gradient descent (not LBFGSB): it accepts the mesh refinement between levels.
    method.SetOptimizerAsGradientDescentLineSearch(
        learningRate=5.0, numberOfIterations=settings.bspline_iterations, convergenceMinimumValue=1e-4, convergenceWindowSize=5
    )
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[2**i for i in range(len(shrink))])
    method.Execute(fixed, moving)
    # Composite transforms apply the last added first: fixed point -> B-spline -> affine -> moving point.
    return sitk.CompositeTransform([affine, bspline])


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
    fixed = sitk.Cast(volume_to_sitk(target_image), sitk.sitkFloat32)
    moving = sitk.Cast(volume_to_sitk(reference_image), sitk.sitkFloat32)
    affine = _register_affine(fixed, moving, settings)
    transform = _register_bspline(fixed, moving, affine, settings)

    labels = volume_to_sitk(reference_labels)
    warped = sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    result = sitk_to_volume(warped, name=f"{reference_labels.name or 'labels'} (registered)", segments=reference_labels.segments)
    result.affine = target_image.affine.copy()  # exactly the target grid, free of float round trips
    return result, time.perf_counter() - start
