"""A second simulator for the benchmark: each layer over all time steps at once.

The network has no recurrence between layers, so each layer can take the whole [T, batch, ...]
output of the layer before: weighted layers run as one large batched call, SpikeNodes run their
own step-by-step update (the same arithmetic, so the same spikes), and max-pooling works on the
cumulative spike counts (integers, so exact in float32). It yields exactly what
`lenet_convert.simulate` yields; on the CPU it is slower (the [T, batch, ...] tensors cost more
memory traffic than the large calls save), which is why it lives here and not in the script.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from bench/

from constant_input import takes_the_image  # noqa: E402
from counting import max_pool  # noqa: E402
from lenet_convert import SMaxPool, SpikeNode, clean_mem_spike, readout_node  # noqa: E402


def simulate_layerwise(snn, images, timesteps, chunk_elements=2**23):
    """Yield the same outputs as `lenet_convert.simulate`, computed layer by layer.

    Images are taken in chunks so that the widest layer's [T, chunk, ...] tensor stays near
    `chunk_elements` floats. A spiking read-out is stepped last, as in `simulate`, so that its
    potential is there for `predict`.
    """
    clean_mem_spike(snn)
    readout = readout_node(snn)
    layers = list(snn)[:-1] if readout else list(snn)
    chunk = max(1, chunk_elements // (_widest(layers, images[:1]) * timesteps))
    clean_mem_spike(snn)  # forget the state of that one-image pass
    currents = torch.cat([_layers_over_time(layers, part, timesteps)
                          for part in images.split(chunk)], dim=1)
    for current in currents:
        yield readout(current) if readout else current


def _widest(layers, image):
    """The most values any layer outputs for one image."""
    widest, x = 1, image
    for layer in layers:
        x = layer(x)
        widest = max(widest, x.numel())
    return widest


def _layers_over_time(layers, images, timesteps):
    """Outputs [T, batch, ...] of `layers` for a constant analog input (the image, into the
    first layer or into an input layer of neurons)."""
    analog = takes_the_image(layers)  # else the input layer is stepped on the constant image
    x = (layers[0](images) if analog else images).unsqueeze(0)  # the same at every step
    for layer in layers[1:] if analog else layers:
        if isinstance(layer, SpikeNode):
            layer.restart()  # a fresh chunk of images; its counts add to the same steps
            x = torch.stack([layer(x[min(t, len(x) - 1)]) for t in range(timesteps)])
        elif isinstance(layer, SMaxPool):
            x = _pool_over_time(layer, x)
        else:  # stateless (weighted layers, flatten): one batched call over all steps
            x = layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return x.expand(timesteps, *x.shape[1:])


def _pool_over_time(pool, spikes):
    """SMaxPool's outputs at all steps from the cumulative input counts C_t."""
    steps, k = spikes.shape[:2], pool.kernel_size
    cumulative = spikes.cumsum(0).flatten(0, 1)
    if pool.lateral_inhibition:  # o_t = MP(C_t) - MP(C_{t-1})
        pooled = max_pool(cumulative, k).unflatten(0, steps)
        out = torch.diff(pooled, dim=0, prepend=torch.zeros_like(pooled[:1]))
    else:  # o_t = MP(x_t + K*C_t) - MP(K*C_t)
        current, weighted = spikes.flatten(0, 1), pool.accumulated_weight * cumulative
        out = max_pool(current + weighted, k) - max_pool(weighted, k)
        out = out.unflatten(0, steps)
    pool.restart()  # a fresh chunk of images; its counts add to the same steps
    pool.count(out)
    return out
