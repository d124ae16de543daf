"""The model's generation_config sampling defaults apply where a request leaves a field out."""
import json

from tokenmill.api.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.api.serving import model_sampling_defaults


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "do_sample": True, "max_new_tokens": 128}))
    defaults = model_sampling_defaults(str(tmp_path))
    assert defaults == {"temperature": 0.7, "top_p": 0.9, "top_k": 50}
    p = CompletionRequest(model="m", prompt="x").sampling_params(defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.7, 0.9, 50)
    p = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                              temperature=0, top_k=5).sampling_params(defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.9, 5)
    assert model_sampling_defaults(str(tmp_path / "missing")) == {}
    plain = CompletionRequest(model="m", prompt="x").sampling_params({})
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)
