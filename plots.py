"""What every figure of the project shares: the file-only backend, the time-step axis, the
text of a conversion's settings in its title, and saving a figure atomically."""

import math

import matplotlib

matplotlib.use("Agg")  # figures go to files, never to a screen
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.ticker  # noqa: E402

import cli  # noqa: E402


def report_steps(timesteps):
    """The steps the table shows: 1, 2, 4, 8, ... and the last."""
    steps = [2**i for i in range(int(math.log2(timesteps)) + 1)]
    return steps if steps[-1] == timesteps else steps + [timesteps]


def settings_text(settings):
    """One line that says how a network was converted (a result's "settings")."""
    scaling = (f"θ=λ/γ (QCFS, L={settings['levels']})" if settings["percentile"] is None
               else f"p={settings['percentile']}")
    return (f"{scaling} per {settings['norm']}, γ={settings['gamma']}, "
            f"V0={settings['v0']:g}θ, reset "
            f"{'to 0' if settings['reset'] == 'zero' else 'by subtraction'}, "
            f"lateral inhibition {'on' if settings['lateral_inhibition'] else 'off'}, "
            f"{settings['readout']} read-out"
            + (f", input as spikes (L_in={settings['input_levels']})"
               if settings.get("input_levels") else "")
            + (f", spike calibration {settings['spicalib']}" if settings["spicalib"] else "")
            + exit_text(settings))


def exit_text(settings):
    """The early-exit part of `settings_text` (empty without an exit rule)."""
    rule = settings["exit_rule"]
    if rule == "none":
        return ""
    threshold, deadline = settings.get("exit_threshold"), settings.get("exit_deadline")
    text = f", early exit at {rule} ≥ " + ("X" if threshold is None else f"{threshold:.5g}")
    text += f" by step {deadline}" if deadline else ""
    if threshold is None:
        text += " (X chosen on validation)" if deadline else " (X, deadline on validation)"
    return text


def step_axis(ax, timesteps):
    """A log-scaled x axis of time steps 1, 2, 4, ..., T."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(report_steps(timesteps))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("time step t")
    ax.grid(True, which="both", alpha=0.3)


def save_figure(fig, path):
    """Save `fig` to `path` atomically and close it."""
    fig.tight_layout()
    with cli.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
