import json

import pytest
import torch
from helpers import DATA, check_refused

import lenet_convert
import look_inside
import options
from checkpoint import load_checkpoint
from lenet5 import model_from_checkpoint
from lenet_convert import build_snn, evaluate_snn, predictions
from mnist import load_mnist
from options import Settings, default_settings


def _look(network, tmp_path, *argv, timesteps=8):
    """`lenet_convert.py --look-inside ...` on the first 100 test images: the JSON of each."""
    facts = lenet_convert.main(["--checkpoint", str(network), "--limit", "100", "--timesteps",
                                str(timesteps), "--data-dir", str(DATA), "--out-dir",
                                str(tmp_path), "--look-inside", *argv])
    for fact in facts:
        for suffix, magic in (("png", b"\x89PNG"), ("gif", b"GIF8")):
            assert (tmp_path / f"inside_{fact['index']}.{suffix}").read_bytes()[:4] == magic
        assert json.loads((tmp_path / f"inside_{fact['index']}.json").read_text()) == fact
    return facts


def _image(index):
    images, labels = load_mnist(DATA, train=False)
    return images[index].float().div_(255)[None, None], labels[index:index + 1]


@pytest.mark.parametrize("settings", [[], ["--readout", "spikes", "--gamma", "1"],
                                      ["--reset", "zero", "--spicalib", "2"],
                                      ["--no-lateral-inhibition", "--norm", "channel"]])
def test_the_figure_counts_what_the_simulation_counts(trained, tmp_path, settings):
    (facts,) = _look(trained, tmp_path, "3", *settings)
    checkpoint = load_checkpoint(trained)
    args = options.parse_args(["--checkpoint", str(trained), *settings])
    snn = build_snn(checkpoint, model_from_checkpoint(checkpoint),
                    options.settings_from(args, checkpoint))
    image, label = _image(3)
    _, counts = evaluate_snn(snn, [(image, label)], 8, "cpu")  # as the script simulates it
    for name, counted in counts.items():
        drawn = facts["spikes_per_layer_and_step"][name]
        if len(counted) == len(drawn):  # per step
            assert drawn == counted.abs().flatten(1).sum(1).tolist(), name
        else:  # the first layer in closed form: all steps in one
            assert sum(drawn) == counted.sum().item(), name
    answers = [p.item() for _, _, p in predictions(snn, image, 8)]
    assert facts["snn_prediction_per_step"] == answers  # the vote's answer, step by step
    votes = torch.tensor(facts["votes_summed_per_step"])
    if "spikes" not in settings:  # the analog vote's argmax is the answer
        assert votes.argmax(1).tolist() == answers
    assert facts["settled_at"] == min(t for t in range(1, 9) if len(set(answers[t - 1:])) == 1)


def test_a_qcfs_network_with_gamma_l_is_on_the_line_after_one_step(qcfs, tmp_path):
    (facts,) = _look(qcfs, tmp_path, "0", timesteps=1)
    assert facts["settings"]["gamma"] == load_checkpoint(qcfs)["levels"]
    for name, points in facts["rate_against_activation"].items():
        activation = torch.tensor(points["activation_over_scale"])
        rate = torch.tensor(points["rate_per_step"])
        assert torch.allclose(rate, activation, atol=1e-4), name  # its SNN is its ANN there
        assert rate.max() > 0, name


def test_the_kinds_of_image_are_found_as_said(trained, tmp_path):
    late, wrong = (facts["index"] for facts in _look(trained, tmp_path, "late", "wrong"))
    checkpoint = load_checkpoint(trained)
    snn = build_snn(checkpoint, model_from_checkpoint(checkpoint), default_settings(checkpoint))
    images, labels = load_mnist(DATA, train=False)
    batch = images[:100].unsqueeze(1).float().div_(255)
    right = torch.stack([p == labels[:100] for _, _, p in predictions(snn, batch, 8)])
    assert late == int((~right[0] & right[-1]).nonzero()[0, 0])
    assert wrong == int((~right[-1]).nonzero()[0, 0])


def test_the_chosen_neurons_are_what_their_names_say():
    record = {"spikes": {"act5": torch.tensor([[2.0, 0, 1, 0], [2, 0, 0, 0]])},
              "potential": {"act5": torch.tensor([[2.5, 0.2, 1.1, 0.9], [2.3, 0.3, 0.4, 0.1]])}}
    assert look_inside.chosen_neurons(record) == [
        (0, "the busiest"), (2, "the one firing least"), (3, "never fires, closest to it")]
    assert look_inside.settled_at([4, 1, 7, 7, 7]) == 3 and look_inside.settled_at([2]) == 1


def test_mosaic_tiles_the_channels():
    maps = torch.arange(2 * 5 * 2 * 3, dtype=torch.float).view(2, 5, 2, 3)
    tiled = look_inside.mosaic(maps, 3)
    assert tiled.shape == (2, 2 * 3 - 1, 3 * 4 - 1)
    assert torch.equal(tiled[:, 3:5, 4:7], maps[:, 4]) and tiled[0, 2].isnan().all()


@pytest.mark.parametrize("argv, message", [
    (["--look-inside", "10000"], r"--look-inside: must be in \[0, 9999\]"),
    (["--look-inside", "soon"], "--look-inside: expected an image index or late or wrong"),
    (["--look-inside", "--compare"], "--look-inside: not with --compare or --exit-rule"),
    (["--look-inside", "--exit-rule", "margin"], "not with --compare or --exit-rule"),
])
def test_bad_look_inside_arguments_give_one_line(argv, message, capsys):
    check_refused(lenet_convert.main, argv, message, capsys)


def test_an_index_beyond_the_images_simulated_is_refused(trained, tmp_path):
    with pytest.raises(SystemExit, match="the test images here are 0 to 99"):
        _look(trained, tmp_path, "150")
    assert not list(tmp_path.iterdir())


def test_default_settings_are_the_scripts(trained):
    checkpoint = load_checkpoint(trained)
    args = options.parse_args(["--checkpoint", str(trained), "--look-inside"])
    assert args.look_inside == [] and options.settings_from(args, checkpoint) == Settings(
        checkpoint["percentile"])
