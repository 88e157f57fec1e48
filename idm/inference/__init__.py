"""Running a trained IDM big or fast: the upscaler, tiling, its memory bound, whole-image
GroupNorm statistics for tiles, and int8 quantization."""
