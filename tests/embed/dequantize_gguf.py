"""Write an all-F32 copy of a GGUF (gguf-py's reader, dequantize and writer): the same weights the engine
decodes, for llama.cpp to run without its quantized-activation kernels (make_decoder_reference.py --exact).

    python tests/embed/dequantize_gguf.py MODEL.gguf MODEL-f32.gguf

Holds every tensor in memory once (gguf-py's writer takes arrays): a tool for fixture-making, not the engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, dequantize


def main(source: Path, target: Path) -> None:
    reader = GGUFReader(source)
    writer = GGUFWriter(target, str(reader.fields["general.architecture"].contents()))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
