import pytest

from aigc.config import ModelConfig, SampleConfig, TrainConfig, from_dict, model_preset, to_dict
from aigc.errors import AigcError


def test_config_round_trips_through_dict():
    config = SampleConfig(stop=("\n\n", "END"), seed=3)
    assert from_dict(SampleConfig, to_dict(config)) == config


def test_model_preset_overrides_and_rejects_unknown():
    assert model_preset("tiny", n_layer=3).n_layer == 3
    with pytest.raises(AigcError, match="tiny, small, base"):
        model_preset("huge")


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: SampleConfig(temperature=-1), "temperature"),
        (lambda: SampleConfig(top_p=0), "top-p"),
        (lambda: SampleConfig(top_k=-1), "top-k"),
        (lambda: SampleConfig(max_new_tokens=0), "max-new-tokens"),
        (lambda: ModelConfig(n_embd=30, n_head=4), "divisible"),
        (lambda: TrainConfig(dtype="fp8"), "fp32"),
    ],
)
def test_config_rejects_invalid_values_with_the_valid_range(factory, message):
    with pytest.raises(AigcError, match=message):
        factory()
