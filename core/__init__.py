"""Pure frequency-hygiene algorithms on numpy arrays.

Colour convention, stated once for the whole package: colour images are
``uint8`` arrays of shape ``(H, W, 3)`` in **RGB** order (what Pillow and
ComfyUI use); single-channel maps are ``float32`` arrays of shape ``(H, W)``.
Functions take the image first and everything else keyword-only, return new
arrays and never modify their input. Nothing here does I/O, logs or reads
settings: that is the job of :mod:`service`.
"""
