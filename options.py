"""Every option of a conversion: its default, its flag, and `Settings`, which carries them.

`Settings` carries how a checkpoint is converted and simulated (the neurons' burst limit, initial
potential and reset, the pool, the read-out, the normalisation, spike calibration, early exit) as
one value through every step; `default_settings` is what a checkpoint brings (a QCFS network is
converted with gamma = L); `settings_from` applies the command line to it, and `settings_record`
is what a result records of it. Every default is in the block below, each with what it means;
`parse_args` is lenet_convert.py's command line (`python lenet_convert.py --help`).
"""

import math
from pathlib import Path
from typing import NamedTuple

import cli
from checkpoint import MAX_INPUT_LEVELS, default_percentile, percentile_key
from mnist import TEST_IMAGES

# ----------------------------------------------------------------------------- defaults
CHECKPOINT = Path("checkpoints/lenet5_best.pt")  # written by lenet5.py
OUT_DIR = Path("results")  # plots and JSON
TIMESTEPS = 64  # simulation steps T
MAX_TIMESTEPS = 100_000  # the most T (and steps anywhere) a run takes; its memory is checked
BATCH_SIZE = 500  # test images simulated at once (a step costs the same per image from 100 to 500)
GAMMA = 2  # burst limit, the most spikes a neuron fires per step (BrainCog's)
MAX_GAMMA = 1024
QCFS_DEFAULT_REASON = ("a QCFS network is converted with gamma = L, its levels, and V0 = "
                       "theta/2: one step gives its ANN's outputs, and on validation this came "
                       "closest to the ReLU ANN in the fewest steps (bench/recipes.py)")
V0 = 0.5  # initial potential in units of the threshold: turns the rate's floor into a rounding
LATERAL_INHIBITION = True  # the exact spiking max-pool
READOUT = "analog"  # sum the output layer's currents; "spikes": count a SpikeNode's spikes
NORM = "layer"  # one activation scale per layer; "channel", "neuron": see NORMS
RESET = "subtract"  # after spiking, lose s thresholds; "zero": the potential goes to 0
SPICALIB = 0  # spike calibration's allowance in steps; 0: off
EXIT_RULE = "none"  # per-image early exit: "margin" or "confidence" of the averaged output
ANN_MARGIN = 0.001  # "at the ANN's level": accuracy within 0.1 percentage points of the ANN's
INPUT_LEVELS = 8  # L_in of --input spikes where the checkpoint was not trained with one

READOUTS = ("analog", "spikes")
INPUTS = ("analog", "spikes")
NORMS = ("layer", "channel", "neuron")  # per layer; per convolution channel; and per neuron
RESETS = ("subtract", "zero")
EXIT_RULES = ("none", "margin", "confidence")
LOOK_INSIDE_KINDS = ("late", "wrong")  # test images --look-inside finds (look_inside.py)
WEIGHT_BITS = (32, 8)  # the energy model's weights: float32, or int8 (energy_models.Hardware)
WEIGHTS_IN = ("sram", "dram")  # in an SRAM sized to each layer's weights, or in DRAM
HARDWARE = ("weight_bits", "weights_in")  # the Settings of the energy model, not of the SNN


class Settings(NamedTuple):
    """How a checkpoint is converted and simulated: one value that every step passes on.

    `percentile` None means the checkpoint's own: a QCFS network's trained lambda, else the
    percentile it recorded as its default. `exit_threshold` None means chosen on the
    validation split, as the fewest mean steps within `exit_margin` of the ANN there, with
    `exit_deadline` (the step by which every image stops; None: chosen with it, or T when the
    threshold is given). `input_levels` None: the analog image enters C1; L_in: the image as
    spikes, an input layer of neurons with threshold 1/L_in, V0 half of it and burst limit L_in.
    """

    percentile: str | None = None
    gamma: int = GAMMA
    v0: float = V0
    lateral_inhibition: bool = LATERAL_INHIBITION
    readout: str = READOUT
    norm: str = NORM
    reset: str = RESET
    spicalib: int = SPICALIB
    exit_rule: str = EXIT_RULE
    exit_threshold: float | None = None
    exit_margin: float = ANN_MARGIN
    exit_deadline: int | None = None
    input_levels: int | None = None
    weight_bits: int = WEIGHT_BITS[0]  # what the energy model with memory traffic assumes
    weights_in: str = WEIGHTS_IN[0]


DEFAULT_SETTINGS = Settings()


# ----------------------------------------------------------------------------- from a checkpoint


def default_settings(checkpoint):
    """The Settings a conversion of `checkpoint` uses unless told otherwise: a ReLU network's
    recorded default percentile; a QCFS network's trained lambda (percentile None) with gamma = L
    (QCFS_DEFAULT_REASON); either takes the image as it was trained on, analog or as spikes."""
    trained = checkpoint.get("input_levels")
    if checkpoint.get("activation") == "qcfs":
        return Settings(None, gamma=checkpoint["levels"], input_levels=trained)
    return Settings(default_percentile(checkpoint), input_levels=trained)


def settings_from(args, checkpoint):
    """The Settings the command line asks for, applied to `checkpoint`; what it leaves open
    (None) is the checkpoint's default (`default_settings`)."""
    asked = {field: getattr(args, field) for field in Settings._fields
             if getattr(args, field) is not None}
    if args.percentile is not None:
        asked["percentile"] = percentile_key(args.percentile)
    asked["exit_margin"] = args.exit_margin / 100  # asked in percentage points
    if args.input == "analog":
        asked["input_levels"] = None
    elif args.input == "spikes" and "input_levels" not in asked:
        asked["input_levels"] = checkpoint.get("input_levels") or INPUT_LEVELS
    return default_settings(checkpoint)._replace(**asked)


def input_text(levels):
    """How the image enters: 'the analog image', or 'the image as spikes (L_in = 8)'."""
    return "the analog image" if levels is None else f"the image as spikes (L_in = {levels})"


def input_neuron(levels):
    """What a result records of the input layer: None for the analog image; else its neurons'
    threshold (of the pixel's range [0, 1]), burst limit and initial potential (of a threshold)."""
    return None if levels is None else {"threshold": 1 / levels, "gamma": levels, "v0": V0}


def settings_record(conversion):
    """The settings as a result records them: with the network they apply to, and for a QCFS
    network's default conversion what it is and why."""
    checkpoint, settings = conversion.checkpoint, conversion.settings
    activation = checkpoint.get("activation", "relu")
    record = settings._asdict() | {
        "activation": activation, "levels": checkpoint.get("levels") if activation == "qcfs"
        else None, "input_neuron": input_neuron(settings.input_levels),
        "trained_input_levels": checkpoint.get("input_levels")}
    if activation == "qcfs" and settings == default_settings(checkpoint):
        record["default"] = QCFS_DEFAULT_REASON
    return record


# ----------------------------------------------------------------------------- command line


def look_inside_arg(text):
    """An argparse type: a test image's index, or one of LOOK_INSIDE_KINDS."""
    if text in LOOK_INSIDE_KINDS:
        return text
    kinds = " or ".join(LOOK_INSIDE_KINDS)
    return cli.int_in(0, TEST_IMAGES - 1, f"an image index or {kinds}")(text)


def parse_args(argv=None, description=None):
    """lenet_convert.py's arguments (`description`: its --help text), checked together."""
    parser = cli.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", type=cli.path_arg, default=CHECKPOINT,
                        help="checkpoint written by lenet5.py (ReLU or QCFS)")
    parser.add_argument("--compare", nargs="*", type=cli.path_arg, default=None,
                        metavar="CHECKPOINT",
                        help="compare settings instead of one run: on --checkpoint the given "
                             "settings, each knob changed alone, early exit and BrainCog's "
                             "reference; on each CHECKPOINT listed (e.g. a QCFS one) the options "
                             "given (the rest at that checkpoint's own defaults), with γ = 1, 2 "
                             "and 4 and with early exit; writes compare.png, .json and .csv")
    parser.add_argument("--look-inside", nargs="*", type=look_inside_arg, default=None,
                        metavar="WHICH", help="instead of the whole test set, draw what every "
                        "layer does, step by step, for each test image WHICH: an index, or "
                        "late (the first the SNN gets wrong after one step and right after T), "
                        "or wrong (the first it gets wrong after T); none given: late; writes "
                        "inside_N.png, .gif and .json")
    parser.add_argument("--timesteps", type=cli.positive_int(MAX_TIMESTEPS), default=TIMESTEPS,
                        help="simulation steps T")
    parser.add_argument("--batch-size", type=cli.positive_int(TEST_IMAGES), default=BATCH_SIZE,
                        help="test images simulated at once")
    parser.add_argument("--percentile", type=cli.percentile_arg, default=None,
                        help="activation percentile that sets each layer's scale (one the "
                             "checkpoint recorded: 99, 99.9, 99.99, 100); default: a QCFS "
                             "checkpoint's trained thresholds, else the checkpoint's percentile")
    parser.add_argument("--gamma", type=cli.positive_int(MAX_GAMMA), default=None,
                        help=f"most spikes a neuron may fire per step (1: plain IF; 2: burst); "
                             f"default: {GAMMA}, but {QCFS_DEFAULT_REASON}")
    parser.add_argument("--v0", type=cli.fraction, default=V0,
                        help="initial membrane potential in units of the threshold, in [0, 1)")
    parser.add_argument("--no-lateral-inhibition", dest="lateral_inhibition",
                        action="store_false", help="use BrainCog's max-pool without lateral "
                        "inhibition (the default pools exactly, with it)")
    parser.add_argument("--readout", choices=READOUTS, default=READOUT,
                        help="sum the output layer's currents, or count its spikes")
    parser.add_argument("--input", choices=INPUTS, default=None,
                        help="the image as a constant current into C1 (analog, BrainCog's), or as "
                             "spikes: an input layer of integrate-and-fire neurons, one per pixel "
                             "(threshold 1/L_in, V0 half of it, burst limit L_in), whose first "
                             "step is the image on L_in levels; C1 then costs accumulates, not "
                             "MACs. Default: as the checkpoint was trained")
    parser.add_argument("--input-levels", type=cli.positive_int(MAX_INPUT_LEVELS), default=None,
                        metavar="L_IN", help="the input layer's levels L_in (implies --input "
                        f"spikes); default: the checkpoint's, else {INPUT_LEVELS}")
    parser.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=WEIGHT_BITS[0],
                        help="energy with memory traffic: the weights' width (32: float32, 8: "
                             "int8 with int32 sums; docs/method.md §7)")
    parser.add_argument("--weights-in", choices=WEIGHTS_IN, default=WEIGHTS_IN[0],
                        help="energy with memory traffic: the weights in an SRAM sized to each "
                             "layer, or in DRAM")
    parser.add_argument("--norm", choices=NORMS, default=NORM,
                        help="one activation scale per layer; per output channel of each "
                             "convolution (BrainCog's channelnorm); or that and per neuron of "
                             "each linear layer (Spiking-YOLO). Needs percentiles, not a QCFS "
                             "network's thresholds")
    parser.add_argument("--reset", choices=RESETS, default=RESET,
                        help="after firing s spikes a neuron's potential loses s thresholds, or "
                             "goes to 0")
    parser.add_argument("--spicalib", type=cli.non_negative_int(MAX_TIMESTEPS), default=SPICALIB,
                        metavar="STEPS",
                        help="spike calibration's allowance: a neuron silent for longer than its "
                             "mean interval between spikes plus STEPS emits -1 (0: off)")
    parser.add_argument("--exit-rule", choices=EXIT_RULES, default=EXIT_RULE,
                        help="stop each image once its answer is settled: margin = top-1 minus "
                             "top-2 of its time-averaged output, confidence = the largest "
                             "softmax of it; writes snn_early_exit.json and .png besides")
    parser.add_argument("--exit-threshold", type=float, default=None, metavar="X",
                        help="stop where the rule's value reaches X (margin: X > 0; "
                             "confidence: 0 < X < 1); default: chosen on the checkpoint's "
                             "validation split, the fewest mean steps within --exit-margin of "
                             "the ANN there")
    parser.add_argument("--exit-deadline", type=cli.positive_int(MAX_TIMESTEPS), default=None,
                        metavar="D",
                        help="the step by which every image stops (at most --timesteps); "
                             "default: chosen on validation with the threshold, or --timesteps "
                             "when --exit-threshold is given")
    parser.add_argument("--exit-margin", type=cli.positive_float, default=100 * ANN_MARGIN,
                        metavar="PP", help="percentage points below the ANN's validation "
                        "accuracy the chosen threshold may lose")
    parser.add_argument("--limit", type=cli.positive_int(TEST_IMAGES), default=None, metavar="N",
                        help="simulate the first N test images only (default: all 10,000)")
    cli.add_device_and_data(parser)
    parser.add_argument("--out-dir", type=cli.path_arg, default=OUT_DIR,
                        help="where the plots and the JSON go")
    args = parser.parse_args(argv)
    if args.look_inside is not None and (args.compare is not None or args.exit_rule != "none"):
        parser.error("argument --look-inside: not with --compare or --exit-rule")
    compared = [args.checkpoint.resolve(), *(p.resolve() for p in args.compare or ())]
    if len(set(compared)) < len(compared):
        parser.error("argument --compare: each checkpoint once (--checkpoint is compared "
                     "already)")
    if args.input == "analog" and args.input_levels is not None:
        parser.error("argument --input-levels: not with --input analog")
    for option in ("deadline", "threshold"):
        if getattr(args, f"exit_{option}") is not None and args.exit_rule == "none":
            parser.error(f"argument --exit-{option}: needs --exit-rule margin or confidence")
    if (args.exit_deadline or 0) > args.timesteps:
        parser.error(f"argument --exit-deadline: {args.exit_deadline} is beyond --timesteps "
                     f"{args.timesteps}")
    threshold, confidence = args.exit_threshold, args.exit_rule == "confidence"
    if threshold is not None and not (0 < threshold < (1 if confidence else math.inf)):
        parser.error(f"argument --exit-threshold: {args.exit_rule} needs "
                     f"{'0 < X < 1' if confidence else 'X > 0'}, got {threshold:g}")
    return args
