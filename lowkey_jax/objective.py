"""The LowKey objective for one photo: pure, unbatched, no jit inside.

For a clean photo ``x`` and its perturbed version ``x'`` (float32 ``[H, W, 3]`` RGB in
[0, 1]) with faces whose alignment transforms are known, LowKey maximises

    D(x') - alpha * P(x, x')

where
- ``D`` is the ensemble feature distance: for every face ``k``, every recogniser ``m`` and
  both branches ``b`` (the plain photo and the Gaussian-smoothed photo ``G(x')``),
  ``(f_m(A_mk(b(x'))) - f_m(A_mk(x)))**2 / ||f_m(A_mk(x))||``, averaged over feature dims,
  branches, recognisers and faces. ``A_mk`` aligns face ``k`` for recogniser ``m`` with a
  differentiable bilinear warp of the full photo, and ``f_m`` is the LowKey feature: the
  L2-normalised sum of the embeddings of the chip and of its horizontal flip.
- ``P`` is LPIPS-AlexNet, half on the whole photo and half on the aligned face crops.

Everything here is a plain function of arrays and callables, usable with the caller's own
``jax.jit`` / ``jax.vmap`` / ``jax.grad``; ``lowkey_jax.attack`` is the one place that
compiles, batches and shards it.

Deviations from the released LowKey code, and why:
1. Every face of the photo is attacked (masked mean over faces); the original uses only
   the first detected face and crashes on photos with none.
2. The smoothed branch is compared with the features of the clean *unsmoothed* photo, as
   in the paper's objective (Eq. 2); the blur uses reflect padding like the reference
   (dm-pix itself zero-pads), and is dm-pix's separable Gaussian computed as fused slices
   (:func:`gaussian_smooth`), which is ~30x faster than dm-pix's grouped conv on CPU.
3. Alignment uses each recogniser's own original geometry (dlib chip, FaceNet margin crop,
   ArcFace template for SFace) instead of one shared 112x112 ArcFace crop, so each model
   sees what its own pipeline would feed it.
4. Photos may be padded to a bucket shape for compilation; ``Geometry.lpips_scale``
   rescales the whole-photo LPIPS so that padding (identical in both images) does not
   dilute it.
5. The whole-photo LPIPS is taken on the photo downscaled to at most 512 pixels (see
   :func:`lpips_term`); the face-crop half is at 112x112 as in the reference.
6. For faces larger than FaceNet's or dlib's chip, whose own pipelines antialias when they
   shrink the face, chips are box-filtered from a denser grid (``Model.supersample``, chosen
   per batch by ``lowkey_jax.attack``); the reference feeds plain bilinear 112x112 crops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lowkey_jax.align import warp_affine
from lowkey_jax.models.layers import cpu_rewrites, depthwise_conv

__all__ = [
    "Geometry",
    "Model",
    "gaussian_smooth",
    "lowkey_features",
    "clean_features",
    "oriented_features",
    "feature_distance",
    "lpips_term",
    "objective",
    "YCBCR_TO_RGB",
    "to_rgb",
    "budget_map",
    "local_contrast",
    "downscaled_view",
    "clean_mid_features",
    "mid_distance",
    "equalise_gradients",
    "face_regions",
]

Embed = Callable[[jax.Array], jax.Array]  # [N, h, w, 3] in [0, 1] -> [N, D]
LPIPSFn = Callable[[jax.Array, jax.Array], jax.Array]  # [N, H, W, 3] x2 -> [N]


class Model(NamedTuple):
    """One recogniser as the objective sees it.

    Attributes:
      embed: ``[N, h, w, 3]`` chips in [0, 1] -> ``[N, D]`` embeddings.
      chip_size: ``(h, w)``.
      supersample: static ``s >= 1``: each chip pixel is the mean of ``s x s`` bilinear
        samples over its footprint (a box prefilter). Use it when a face is larger than the
        chip and the model's own pipeline antialiases (FaceNet's resize, dlib's pyramid):
        plain bilinear sampling would then see only a sparse subset of the photo's pixels,
        and a perturbation tuned to that subset is averaged away by the real pipeline.
      embed_mid: like ``embed``, also returning an intermediate activation map ``[N, ...]``
        (the model's ``mid=True``), for the feature-level term of :func:`objective`.
    """

    embed: Embed
    chip_size: tuple[int, int]
    supersample: int = 1
    embed_mid: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None


class Geometry(NamedTuple):
    """Where the faces of one photo are (a pytree: vmappable over photos).

    Attributes:
      transforms: ``{model name: float32 [F, 2, 3]}`` affine maps from chip pixel coords to
        photo pixel coords (see :func:`lowkey_jax.align.warp_affine`), one per face slot.
      lpips_transforms: float32 ``[F, 2, 3]`` maps to the 112x112 crops used by LPIPS.
      mask: float32 ``[F]``: 1 for a real face, 0 for a padding slot.
      lpips_scale: float32 scalar: (padded area) / (photo area), 1 when unpadded.
    """

    transforms: Mapping[str, jax.Array]
    lpips_transforms: jax.Array
    mask: jax.Array
    lpips_scale: jax.Array


LPIPS_CROP = (112, 112)


def gaussian_smooth(image: jax.Array, sigma: float = 3.0, kernel_size: int = 7) -> jax.Array:
    """Gaussian blur of ``[H, W, 3]`` with reflect padding (as the reference).

    Computes exactly what ``dm_pix.gaussian_blur(padded, sigma, kernel_size,
    padding="VALID")`` computes (same kernel, horizontal pass then vertical pass; the tests
    compare the two), but through :func:`lowkey_jax.models.layers.depthwise_conv`: dm-pix
    runs a grouped convolution, which XLA's CPU backend makes ~30x slower than fused slices.
    Off the CPU (``layers.cpu_rewrites()`` false) it calls ``dm_pix.gaussian_blur`` itself.
    """
    r = kernel_size // 2
    padded = jnp.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")
    if not cpu_rewrites():  # GPU / TPU: dm-pix itself (its grouped convolution is fast there)
        import dm_pix

        return dm_pix.gaussian_blur(padded, sigma, kernel_size, padding="VALID")
    x = jnp.arange(-r, r + 1).astype(jnp.float32)
    taps = jnp.exp(-(x**2) / (2.0 * jnp.float32(sigma) ** 2))
    taps = jnp.tile((taps / jnp.sum(taps))[:, None], (1, image.shape[-1]))  # [k, C]
    valid = ((0, 0), (0, 0))
    out = depthwise_conv(padded[None], taps[None, :, None, :], 1, valid)  # horizontal
    return depthwise_conv(out, taps[:, None, None, :], 1, valid)[0]  # vertical


def _denser(transforms: jax.Array, s: float) -> jax.Array:
    """Chip transforms ``[F, 2, 3]`` re-expressed for a grid ``s`` times denser over the same
    chip area (sample ``u`` sits at chip coordinate ``(u + 0.5) / s - 0.5``)."""
    o = (1.0 / s - 1.0) / 2.0
    return transforms @ jnp.asarray([[1.0 / s, 0.0, o], [0.0, 1.0 / s, o], [0.0, 0.0, 1.0]], jnp.float32)


def _chips(image: jax.Array, transforms: jax.Array, size: tuple[int, int], supersample: int = 1) -> jax.Array:
    """``[F, h, w, C]`` chips; with ``supersample = s > 1``, box-filtered from an ``s``-times
    denser bilinear grid (sample ``u`` sits at chip coordinate ``(u + 0.5) / s - 0.5``)."""
    s = int(supersample)
    if s == 1:
        return jax.vmap(lambda m: warp_affine(image, m, size))(transforms)
    dense = jax.vmap(lambda m: warp_affine(image, m, (size[0] * s, size[1] * s)))(_denser(transforms, s))
    f, _, _, c = dense.shape
    return jnp.mean(dense.reshape(f, size[0], s, size[1], s, c), axis=(2, 4))


def _l2_normalise(x: jax.Array) -> jax.Array:
    ss = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(ss, jnp.float32(1e-12)))


def lowkey_features(model: Model, image: jax.Array, transforms: jax.Array) -> jax.Array:
    """LowKey features ``[F, D]``: L2-normalised (embed(chip) + embed(flipped chip))."""
    return _features_of_chips(model, _chips(image, transforms, model.chip_size, model.supersample))


def _features_of_chips(model: Model, chips: jax.Array, mid: bool = False):
    """``[B, h, w, 3]`` chips -> ``[B, D]`` LowKey features (chips and flips in one call);
    with ``mid``, also the intermediate maps ``[2, B, ...]`` of the chips and of their flips."""
    b = chips.shape[0]
    both = jnp.concatenate([chips, chips[:, :, ::-1, :]], axis=0)
    if not mid:
        emb = model.embed(both)
        return _l2_normalise(emb[:b] + emb[b:])
    if model.embed_mid is None:
        raise ValueError("this model has no intermediate map (Model.embed_mid)")
    emb, inner = model.embed_mid(both)
    return _l2_normalise(emb[:b] + emb[b:]), inner.reshape(2, b, *inner.shape[1:])


def clean_features(models: Mapping[str, Model], image: jax.Array, geometry: Geometry) -> dict[str, jax.Array]:
    """The targets ``f_m(A_mk(x))`` of the clean photo, computed once before the attack."""
    return {name: lowkey_features(m, image, geometry.transforms[name]) for name, m in models.items()}


def oriented_features(models: Mapping[str, Model], image: jax.Array, geometry: Geometry) -> dict[str, jax.Array]:
    """Targets for the random-orientation objective (``objective(orientation=...)``):
    ``{name: [2, F, D]}``, the L2-normalised embeddings of each clean chip (index 0) and of
    its horizontal flip (index 1), each on its own."""
    out = {}
    for name, m in models.items():
        chips = _chips(image, geometry.transforms[name], m.chip_size, m.supersample)
        f = chips.shape[0]
        emb = _l2_normalise(m.embed(jnp.concatenate([chips, chips[:, :, ::-1, :]], axis=0)))
        out[name] = emb.reshape(2, f, emb.shape[-1])
    return out


def clean_mid_features(models: Mapping[str, Model], image: jax.Array, geometry: Geometry) -> dict[str, jax.Array]:
    """The clean photo's intermediate maps ``{name: [2, F, ...]}`` (chips, flips) for the
    feature-level term, computed once before the attack."""
    return {name: _features_of_chips(m, _chips(image, geometry.transforms[name], m.chip_size, m.supersample), mid=True)[1]
            for name, m in models.items()}


def mid_distance(adv: jax.Array, clean: jax.Array, mask: jax.Array) -> jax.Array:
    """Relative change of an intermediate map, ``||adv - clean||^2 / ||clean||^2`` per chip,
    averaged over chip and flip and over real faces; ``[2, F, ...]`` x2, ``[F]`` -> scalar."""
    axes = tuple(range(2, adv.ndim))
    rel = jnp.sum((adv - clean) ** 2, axis=axes) / jnp.maximum(jnp.sum(clean * clean, axis=axes), jnp.float32(1e-12))
    per_face = jnp.mean(rel, axis=0)
    return jnp.sum(per_face * mask) / jnp.maximum(jnp.sum(mask), jnp.float32(1.0))


def feature_distance(adv: jax.Array, clean: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real faces and dims of ``(adv - clean)**2 / ||clean||``; ``[F, D]`` -> scalar."""
    norm = jnp.sqrt(jnp.maximum(jnp.sum(clean * clean, axis=-1), jnp.float32(1e-12)))
    per_face = jnp.mean((adv - clean) ** 2, axis=-1) / norm
    return jnp.sum(per_face * mask) / jnp.maximum(jnp.sum(mask), jnp.float32(1.0))


@jax.custom_vjp
def equalise_gradients(chips: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Identity on each recogniser's chips; in the backward pass, each recogniser's chip
    gradient is rescaled so that all have the same L1 size per face (the mean of theirs).

    ``chips``: one ``[B * F, h, w, 3]`` array per recogniser (``B`` branches of ``F`` face
    slots, branch-major, as :func:`objective` builds them). The signed step follows the sign
    of the summed gradient, and the recogniser with the largest gradient decides it: SFace's
    gradient is 10-45x larger than FaceNet's on celebs faces, so without this FaceNet and
    dlib steer under a fifth of the pixels (``Config.equalise``). The total is kept, so the
    LPIPS weight keeps its meaning. Padding slots (zero gradient) stay zero.
    """
    return chips


def _equalise_fwd(chips):
    return chips, tuple(c.shape for c in chips)


def _equalise_bwd(shapes, cts):
    faces = min(s[0] for s in shapes)  # F (every model has B * F chips with the same B)
    per_face = [jnp.sum(jnp.abs(ct).reshape(-1, faces, *ct.shape[1:]), axis=(0, 2, 3, 4)) for ct in cts]  # [F] each
    mean = sum(per_face) / len(per_face)
    out = []
    for ct, l1 in zip(cts, per_face):
        scale = jnp.where(l1 > 0, mean / jnp.maximum(l1, jnp.float32(1e-30)), jnp.float32(0.0))  # [F]
        out.append((ct.reshape(-1, faces, *ct.shape[1:]) * scale[None, :, None, None, None]).reshape(ct.shape))
    return (tuple(out),)


equalise_gradients.defvjp(_equalise_fwd, _equalise_bwd)


def _shrink(image: jax.Array, max_side: int) -> jax.Array:
    h, w = image.shape[:2]
    s = max_side / max(h, w)
    if s >= 1.0:
        return image
    shape = (max(32, round(h * s)), max(32, round(w * s)), image.shape[2])
    return jax.image.resize(image, shape, "linear", antialias=True)


def downscaled_view(image: jax.Array, transforms: Mapping[str, jax.Array], factor: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The photo as a smaller copy of it reaches a recogniser (a platform's resize, a
    scraper's thumbnail): ``image`` ``[H, W, C]`` shrunk by ``factor`` in (0, 1] (linear,
    antialiased: ``jax.image.scale_and_translate``) onto a canvas of the same static shape
    (top-left; the rest is 0), and the chip transforms ``{name: [F, 2, 3]}`` mapped onto it.
    ``factor`` may be traced (a fresh random size each step, see ``Config.rescale``)."""
    h, w, c = image.shape
    f = jnp.asarray(factor, jnp.float32)
    small = jax.image.scale_and_translate(image, (h, w, c), (0, 1), jnp.stack([f, f]), jnp.zeros((2,), jnp.float32),
                                          "linear", antialias=True)
    # Pixel centres: index i of the photo sits at (i + 0.5) * f - 0.5 of the small copy.
    shift = jnp.asarray([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], jnp.float32) * (0.5 * f - 0.5)  # [2, 3]
    moved = {name: t * f + shift[None] for name, t in transforms.items()}
    return small, moved


def lpips_term(lpips: LPIPSFn, adv: jax.Array, clean: jax.Array, geometry: Geometry, *, max_side: int = 512,
               face_side: int = LPIPS_CROP[0]) -> jax.Array:
    """Half LPIPS on the whole photo, half the mean LPIPS over the aligned face crops.

    The whole-photo half is computed on the photo downscaled (antialiased) to at most
    ``max_side`` pixels: LPIPS is a perceptual measure of the photo as seen, and at full
    working resolution its AlexNet pass would cost more than the whole recogniser ensemble.
    The face crops cover the ArcFace template's area at ``face_side`` x ``face_side`` pixels
    (112 as the reference; larger sees the face closer to its native resolution).
    """
    whole = lpips(_shrink(adv, max_side)[None], _shrink(clean, max_side)[None])[0] * geometry.lpips_scale
    t = geometry.lpips_transforms
    if face_side != LPIPS_CROP[0]:
        t = _denser(t, face_side / LPIPS_CROP[0])
    crops_adv = _chips(adv, t, (face_side, face_side))
    crops_clean = _chips(clean, t, (face_side, face_side))
    faces = lpips(crops_adv, crops_clean)
    mask = geometry.mask
    faces = jnp.sum(faces * mask) / jnp.maximum(jnp.sum(mask), jnp.float32(1.0))
    return 0.5 * whole + 0.5 * faces


def objective(
    adv: jax.Array,
    clean: jax.Array,
    geometry: Geometry,
    models: Mapping[str, Model],
    targets: Mapping[str, jax.Array],
    lpips: LPIPSFn,
    *,
    alpha: float = 0.05,
    blur: bool = True,
    plain: bool = True,
    blur_sigma: float = 3.0,
    blur_kernel: int = 7,
    lpips_max_side: int = 512,
    lpips_face_side: int = LPIPS_CROP[0],
    balance: bool = False,
    view_scale: jax.Array | None = None,
    mid_weight: float = 0.0,
    mid_targets: Mapping[str, jax.Array] | None = None,
    equalise: bool = False,
    orientation: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The LowKey objective (to be maximised) and its parts.

    Args:
      adv, clean: float32 ``[H, W, 3]`` RGB in [0, 1].
      geometry: the faces of this photo.
      models: ``{name: Model}``, the ensemble.
      targets: ``clean_features(models, clean, geometry)``.
      lpips: LPIPS distance function.
      blur, plain: the branches the recognisers see: the Gaussian-smoothed photo
        (``blur_sigma``, ``blur_kernel``) and the plain one; the reference attacks both.
      balance: weight each recogniser's term by its feature dimension over the ensemble's
        mean dimension. The reference's mean over dims makes a term ``2 (1 - cos) / D`` for
        unit features, so FaceNet's 512-D term counts 4x less than dlib's and SFace's 128-D
        ones for the same change of cosine; balanced, every recogniser counts alike (and the
        weights average 1, so the LPIPS weight keeps its meaning).
      view_scale: if given (a scalar in (0, 1], may be traced), the recognisers see both
        branches shrunk by this factor (:func:`downscaled_view`); the LPIPS penalty still
        judges the photo at full size.
      mid_weight: weight of a feature-level term (0: off, as the reference): for every
        recogniser and branch, the relative change of an intermediate activation map
        (:func:`mid_distance`; the model's ``mid=True`` layer, half-way through the network)
        divided by the feature dimension, so that a weight of 1 counts a relative change in
        the middle of the network like the same relative change of the (unit) features.
        Attacks on intermediate layers are known to transfer better to other networks
        (Huang et al. 2019, ILA; Ganeshan et al. 2019, FDA).
      mid_targets: ``clean_mid_features(models, clean, geometry)``; needed when
        ``mid_weight > 0``.
      equalise: rescale each recogniser's gradient to the same size per face
        (:func:`equalise_gradients`); the value of the objective is unchanged.
      orientation: ``{name: bool [branches, F]}`` or None (the reference: every chip is seen
        as itself and as its horizontal flip, and the LowKey feature is their normalised
        sum). Given, each chip is seen in one orientation only (True: flipped), half the
        recognisers' work, and compared with the clean chip's feature in that orientation:
        ``targets`` must then be :func:`oriented_features` (``[2, F, D]`` per model). With a
        fresh random choice every step this is the reference's flip averaged over steps
        instead of within each one (``Config.flip="random"``). Not with ``mid_weight``.
    Returns:
      ``(loss, {"distance": D, "lpips": P})``, scalars.
    """
    if mid_weight > 0 and mid_targets is None:
        raise ValueError("mid_weight > 0 needs mid_targets (clean_mid_features of the clean photo)")
    if mid_weight > 0 and orientation is not None:
        raise ValueError("the feature-level term (mid_weight) needs both orientations (orientation=None)")
    if not (plain or blur):
        raise ValueError("no branch to attack: plain and blur are both off")
    branches = [adv] if plain else []
    if blur:
        branches.append(gaussian_smooth(adv, blur_sigma, blur_kernel))
    transforms = geometry.transforms
    if view_scale is not None:
        views = [downscaled_view(b, geometry.transforms, view_scale) for b in branches]
        branches, transforms = [v[0] for v in views], views[0][1]
    terms = []
    dims = {name: targets[name].shape[-1] for name in models}
    mean_dim = sum(dims.values()) / len(dims)
    # Both branches' chips go through each network in one call: [branches * F] chips.
    all_chips = tuple(jnp.concatenate([_chips(b, transforms[name], model.chip_size, model.supersample)
                                       for b in branches]) for name, model in models.items())
    if orientation is not None:  # one orientation per chip: flipped where chosen
        all_chips = tuple(jnp.where(orientation[name].reshape(-1)[:, None, None, None], c[:, :, ::-1, :], c)
                          for name, c in zip(models, all_chips))
    if equalise and len(all_chips) > 1:
        all_chips = equalise_gradients(all_chips)
    for (name, model), chips in zip(models.items(), all_chips):
        weight = dims[name] / mean_dim if balance else 1.0
        nb = len(branches)
        if mid_weight > 0:
            feats, inner = _features_of_chips(model, chips, mid=True)
            inner = inner.reshape(2, nb, -1, *inner.shape[2:])  # [chip/flip, branch, F, ...]
        elif orientation is not None:
            feats = _l2_normalise(model.embed(chips))
        else:
            feats = _features_of_chips(model, chips)
        feats = feats.reshape(nb, -1, targets[name].shape[-1])
        for b, f in enumerate(feats):
            target = targets[name]
            if orientation is not None:  # [2, F, D] -> the chosen orientation's [F, D]
                target = jnp.where(orientation[name][b][:, None], target[1], target[0])
            term = feature_distance(f, target, geometry.mask)
            if mid_weight > 0:
                rel = mid_distance(inner[:, b], mid_targets[name], geometry.mask)
                term = term + jnp.float32(mid_weight / dims[name]) * rel
            terms.append(term * jnp.float32(weight))
    distance = jnp.mean(jnp.stack(terms))
    perceptual = lpips_term(lpips, adv, clean, geometry, max_side=lpips_max_side, face_side=lpips_face_side)
    return distance - alpha * perceptual, {"distance": distance, "lpips": perceptual}


# --- perceptual shaping of the perturbation (used by lowkey_jax.attack) ------------------

# Rows: R, G, B as combinations of (Y, Cb, Cr) offsets (ITU-R BT.601, full range). A
# perturbation optimised in these coordinates can give luminance and colour different
# budgets: the eye forgives small luminance changes in texture far more than hue shifts
# (eye colour, skin tone), which is what CIEDE2000 measures.
YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def to_rgb(z: jax.Array, chroma: float | None) -> jax.Array:
    """The RGB perturbation ``[..., 3]`` for optimisation variables ``z``.

    ``chroma=None``: ``z`` is already RGB (the reference's parameterisation). Otherwise ``z``
    is a (Y, Cb, Cr) offset, mapped linearly to RGB.
    """
    if chroma is None:
        return z
    return z @ jnp.asarray(YCBCR_TO_RGB, jnp.float32).T


def _luma(image: jax.Array) -> jax.Array:
    """ITU-R BT.601 luminance ``[H, W]`` of an RGB image ``[H, W, 3]``."""
    return image @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)


def local_contrast(image: jax.Array, sigma: float = 2.0, kernel: int = 9) -> jax.Array:
    """Local standard deviation of luminance, ``[H, W, 3]`` in [0, 1] -> ``[H, W, 1]``.

    Computed with the same reflect-padded Gaussian as :func:`gaussian_smooth`; a texture
    measure for the just-noticeable-difference mask of :func:`budget_map`.
    """
    y = _luma(image)
    y3 = jnp.stack([y, y * y, y], axis=-1)  # gaussian_smooth works on 3 channels
    m = gaussian_smooth(y3, sigma, kernel)
    var = jnp.maximum(m[..., 1] - m[..., 0] ** 2, jnp.float32(0.0))
    return jnp.sqrt(var + jnp.float32(1e-12))[..., None]


TEXTURE_REF = 0.04  # local luminance std (about 10/255) at which the full budget applies


def isotropy(image: jax.Array, sigma: float = 2.0, kernel: int = 9) -> jax.Array:
    """How little the local structure has one direction, ``[H, W, 3]`` -> ``[H, W, 1]`` in [0, 1].

    ``2 l2 / (l1 + l2)`` of the eigenvalues ``l1 >= l2`` of the luminance structure tensor
    (central-difference gradients, products smoothed with the Gaussian of
    :func:`local_contrast`): 0 on a straight edge or line (a brow's outline, the rim of an
    eye, the side of the nose), about 1 in texture with no main direction (skin pores,
    fabric, foliage) and on flat areas, where both eigenvalues vanish. An edge hides a change
    along it far less than texture does (edge masking is weaker than texture masking in
    just-noticeable-difference models, e.g. Yang et al. 2005), and a change at a facial
    feature's outline reshapes the feature.
    """
    yp = jnp.pad(_luma(image), 1, mode="edge")
    gx = 0.5 * (yp[1:-1, 2:] - yp[1:-1, :-2])
    gy = 0.5 * (yp[2:, 1:-1] - yp[:-2, 1:-1])
    j = gaussian_smooth(jnp.stack([gx * gx, gx * gy, gy * gy], axis=-1), sigma, kernel)
    trace = j[..., 0] + j[..., 2]
    root = jnp.sqrt((j[..., 0] - j[..., 2]) ** 2 + 4.0 * j[..., 1] ** 2)
    small = jnp.maximum(trace - root, jnp.float32(0.0))  # 2 * l2
    flat = trace <= 1e-8
    return jnp.where(flat, jnp.float32(1.0), small / jnp.where(flat, jnp.float32(1.0), trace))[..., None]


def face_regions(geometry: Geometry, shape: tuple[int, int]) -> jax.Array:
    """Which face each pixel of a ``shape = (H, W)`` photo belongs to: int32 ``[H, W]``, the
    slot of the real face (``geometry.mask``) whose centre is nearest, distances measured in
    units of each face's size (the side of its 112x112 ArcFace-template crop in photo
    pixels, from ``geometry.lpips_transforms``), so a small face next to a large one keeps
    a small region. Pixels far from every face still get the nearest one (their gradient is
    the whole-photo LPIPS term's, small). Slot 0 everywhere if there is no real face.
    """
    h, w = (int(v) for v in shape)
    t = geometry.lpips_transforms  # [F, 2, 3]: crop (x, y, 1) -> photo (x, y)
    half = jnp.float32(LPIPS_CROP[0] / 2.0)
    centre = t[:, :, 0] * half + t[:, :, 1] * half + t[:, :, 2]  # [F, 2] photo (x, y)
    size2 = jnp.abs(t[:, 0, 0] * t[:, 1, 1] - t[:, 0, 1] * t[:, 1, 0]) * jnp.float32(LPIPS_CROP[0] ** 2)
    ys = jnp.arange(h, dtype=jnp.float32)[:, None]
    xs = jnp.arange(w, dtype=jnp.float32)[None, :]
    best = jnp.full((h, w), jnp.inf, jnp.float32)
    index = jnp.zeros((h, w), jnp.int32)
    for f in range(t.shape[0]):  # static, at most a pass's face slots; keeps memory at [H, W]
        d = ((xs - centre[f, 0]) ** 2 + (ys - centre[f, 1]) ** 2) / jnp.maximum(size2[f], jnp.float32(1e-6))
        d = jnp.where(geometry.mask[f] > 0, d, jnp.float32(jnp.inf))
        closer = d < best
        best = jnp.where(closer, d, best)
        index = jnp.where(closer, jnp.int32(f), index)
    return index


def budget_map(clean: jax.Array, epsilon: float, texture: float, chroma: float | None, edges: float = 0.0) -> jax.Array:
    """Per-pixel, per-variable L-inf budget ``[H, W, 3]`` for the optimisation variables.

    ``epsilon`` is the budget on [0, 1] images (of each RGB channel, or of luminance Y when
    ``chroma`` is set; Cb and Cr then get ``chroma * epsilon``). ``texture`` in [0, 1] blends
    in a just-noticeable-difference mask: the budget is scaled by
    ``(1 - texture) + texture * m`` with ``m = min(1, local_contrast / TEXTURE_REF)``, so
    smooth skin and the flat parts of the eyes get less change than hair, edges and textured
    background. ``edges`` in [0, 1] takes the masking away from edges: ``m`` is multiplied by
    ``(1 - edges) + edges * isotropy``, so with ``edges=1`` the outline of a brow, an eye or
    the nose gets the budget of smooth skin and only texture without a main direction keeps
    the full budget.
    """
    scale = jnp.ones(clean.shape[:2] + (1,), jnp.float32)
    if texture > 0:
        m = jnp.minimum(local_contrast(clean) / jnp.float32(TEXTURE_REF), jnp.float32(1.0))
        if edges > 0:
            m = m * (jnp.float32(1.0 - edges) + jnp.float32(edges) * isotropy(clean))
        scale = jnp.float32(1.0 - texture) + jnp.float32(texture) * m
    per = jnp.asarray([1.0, 1.0, 1.0] if chroma is None else [1.0, chroma, chroma], jnp.float32)
    return jnp.float32(epsilon) * scale * per[None, None, :]
