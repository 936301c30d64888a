"""The native-port oracle lives in `tools.oracle` (the benchmarks use it too); tests import it from here as well."""

from tools.oracle import (
    KEY_RENAMES, PATCH_DIM, image, native_inputs, native_twin, our_inputs, packed_inputs, pad, prompt_ids, video,
)

__all__ = [
    "KEY_RENAMES", "PATCH_DIM", "image", "native_inputs", "native_twin", "our_inputs", "packed_inputs", "pad",
    "prompt_ids", "video",
]
