"""The one image loader: every stage and backend sees an image as an image viewer shows it.

    load_image(path or PIL image, where) -> an RGB PIL image, decoded in full, EXIF orientation applied
    check_image(path, where)             -> its (width, height): the same load, kept only as a check

Used wherever pixels are read: vlaa.records checks every record's image when its file is loaded (01, 04, 05,
06's toy/jsonl sets; vlaa.records.load_benchmark_rows for 06's local benchmark copies), so a file cut short is a
bad record before any model runs, named by file, line, id and field or counted by --skip-bad; then at use
vlaa.qwen.prompt_encoder (04, 05), the hf and vllm backends (vlaa.backends.request_image), the openai backend
(vlaa.openai_client, before the PNG data URL), the toy teacher, the reward judges and vlaa.collect.

Why a loader of our own: PIL's `convert("RGB")` clips 16-bit and float pixels (a 16-bit scan turns near white),
drops alpha (a transparent PNG's hidden colour shows, often black) and ignores EXIF orientation (a phone photo
lies on its side). Peers differ (VLMEvalKit and qwen-vl-utils: `convert("RGB")`, RGBA pasted on white by
qwen-vl-utils only); we do what a viewer does for every mode PIL opens:

    RGB, L, 1, P, CMYK, YCbCr, HSV   PIL's conversion (palettes looked up, 1-bit -> 0/255, CMYK naive, no ICC)
    alpha: RGBA, LA, PA, La, RGBa,   composited on white: c * a + 255 * (1 - a), rounded; a palette or a
      P/L/RGB with `transparency`    tRNS colour counts as alpha
    I;16, I;16B, I;16L, I;16N        scaled from 0-65535: v / 257, rounded (65535 -> 255, 32768 -> 128)
    I (32-bit int)                   as 16-bit when every value is in 0-65535 (how 16-bit files used to open),
                                     else stretched from its min-max
    F (float)                        0-1 -> 0-255, else 0-255 as is, else stretched from its min-max; NaN -> 0
    LAB                              through littlecms (ImageCms), to sRGB
"""

import os

from vlaa.jsonl import InputError

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decompression-bomb guard: refuse images above 64 Mpx
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's resize refuses thinner images (smart_resize raises above 200:1)
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def check_image(path, where=""):
    """Load the image as every stage will (load_image) and return its (width, height): a file that is missing,
    not an image, too large, too thin or cut short is an error naming `where` and the path."""
    return load_image(path, where).size


def load_image(image, where=""):
    """A path (or a PIL image, e.g. from the hub) -> RGB PIL image: the header checked (size, aspect ratio)
    before any pixel is decoded, then every pixel decoded (a cut file raises here, not mid-training), turned
    upright by its EXIF orientation, and converted as a viewer would (to_rgb)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    if not isinstance(image, str):
        return to_rgb(ImageOps.exif_transpose(image))
    if not os.path.exists(image):
        raise FileNotFoundError(f"{prefix}image not found: {image}")
    if not os.path.isfile(image):  # a directory, a device, a pipe (reading one could block forever)
        raise InputError(f"{prefix}not an image: {image} (not a regular file)")
    try:
        im = Image.open(image)  # reads only the header
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{prefix}not an image: {image} ({e})") from None
    with im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(f"{prefix}image too large ({w}x{h} px, limit {MAX_IMAGE_PIXELS} px): {image}")
        if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
            raise InputError(f"{prefix}image too thin ({w}x{h} px, aspect ratio limit {MAX_ASPECT_RATIO}): {image}")
        try:
            im.load()  # every pixel: a file cut short ("image file is truncated") fails here
            return to_rgb(ImageOps.exif_transpose(im))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"{prefix}unreadable image {image}: {e}") from None


def to_rgb(im):
    """Any PIL mode -> RGB as a viewer shows it (the table in the module docstring)."""
    import numpy as np
    from PIL import Image

    if im.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(_to_8bit(im.mode, np.asarray(im)), "L").convert("RGB")
    if im.mode == "La":  # premultiplied alpha: PIL converts it to nothing but LA
        im = im.convert("LA")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)  # [H, W, 4]; PIL applies palette and tRNS alpha
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        return Image.fromarray(((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8), "RGB")
    if im.mode == "LAB":  # PIL's plain convert reads L*a*b* bytes as if they were RGB
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")
        return ImageCms.applyTransform(im, lab_to_srgb)
    return im if im.mode == "RGB" else im.convert("RGB")


def _to_8bit(mode, values):
    """High bit-depth grey values -> uint8 0-255 by the range of the mode (the table in the module docstring)."""
    import numpy as np

    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    scaled = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.floor(scaled + 0.5).clip(0, 255).astype(np.uint8)
