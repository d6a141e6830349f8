"""`torch.export` with dynamic H and W (the path of Keras's LiteRT export from
torch and of `format="torch"`): the layer must not pin the spatial size it was
traced at. `position.resize_table` used to cast the symbolic length to a
number, which specialised H and W ("Constraints violated (H, W)")."""

import pytest
import keras

from harness import LEARNED_ENCODINGS, assert_float32_within_budget, make_case, random_input

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="torch.export: the torch backend only")

# (position encoding, reference size of its tables)
CASES = [("none", None), ("sinusoidal", None),
         *[(name, (5, 5)) for name in LEARNED_ENCODINGS]]


@pytest.mark.parametrize("encoding, position_size", CASES, ids=[c[0] for c in CASES])
def test_torch_export_keeps_height_and_width_dynamic(encoding, position_size):
    import torch

    config = {"num_heads": 2, "position_encoding": encoding}
    if position_size:
        config["position_size"] = position_size
    layer, x, weights = make_case(config, (2, 6, 6, 8))
    inputs = keras.Input((None, None, 8))
    model = keras.Model(inputs, layer(inputs))
    height, width = torch.export.Dim("H", min=2, max=64), torch.export.Dim("W", min=2, max=64)
    program = torch.export.export(model, (torch.from_numpy(x),),
                                  dynamic_shapes=(({1: height, 2: width},),), strict=False)
    for seed, shape in enumerate([(2, 5, 5, 8), (2, 7, 4, 8)]):  # the tables' size, another
        x = random_input(shape, seed=seed)
        with torch.no_grad():
            out = program.module()(torch.from_numpy(x)).numpy()
        assert_float32_within_budget(out, x, weights, layer.get_config(),
                                     what=f"exported at {shape}")
