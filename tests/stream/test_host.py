import pytest
import torch

from sinkquant.stream.host import ResidentModel, StreamedModel, build_skeleton, release
from tests.tiny_models import save_tiny, tiny_gemma3, tiny_llama, tiny_qwen2

ARCHITECTURES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_skeleton_holds_no_weights_and_the_buffers_the_loader_computes(arch):
    model = ARCHITECTURES[arch]()
    skeleton = build_skeleton(model.config, torch.float32)
    assert all(p.is_meta for p in skeleton.parameters())
    real, built = dict(model.named_buffers()), dict(skeleton.named_buffers())
    assert real.keys() == built.keys()
    assert all(torch.equal(real[k], built[k]) for k in real)  # rotary frequencies, Gemma's embedding scale


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_streamed_layer_computes_what_the_loaded_one_does_and_is_freed_after(arch, tmp_path):
    model = ARCHITECTURES[arch]()
    folder = save_tiny(model, tmp_path / arch)
    host = StreamedModel(folder, model.config)
    resident = ResidentModel(model)
    x = torch.randn(1, 8, model.config.hidden_size)
    with host.layer(1) as layer, resident.layer(1) as theirs:
        assert all(not p.is_meta for p in layer.parameters())
        mlp = type(layer.mlp).__name__
        assert torch.equal(layer.mlp(x), theirs.mlp(x)), mlp
    assert all(p.is_meta for p in host.layers[1].parameters())
    with host.outside() as skeleton:
        emb = skeleton.get_input_embeddings().weight
        assert torch.equal(emb, model.get_input_embeddings().weight)
        tied = skeleton.config.tie_word_embeddings
        assert (skeleton.get_output_embeddings().weight is emb) == bool(tied)
    assert skeleton.get_input_embeddings().weight.is_meta


def test_release_keeps_hooks_and_structure():
    model = tiny_llama()
    layer = model.model.layers[0]
    seen = []
    layer.register_forward_hook(lambda *a: seen.append(1))
    release(layer)
    assert all(p.is_meta for p in layer.parameters()) and len(layer._forward_hooks) == 1
