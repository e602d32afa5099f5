#!/usr/bin/env python3
"""The pictures of docs/pictures.md, drawn by tools/visualize.py's render() on a generated example:
a small VOLO and a small Visformer trained here, on the CPU, on scenes of one red or blue square on
dim noise (data.synthetic.object_scenes: the VOLO's aux_head learns a class per token, background
included), then drawn for a scene whose red square sits in the top-left corner.

    python -m tools.doc_pictures --out docs/pictures       # about 5 minutes on 2 CPU cores
"""
import argparse
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data.synthetic import object_scenes
from models.visformer import Visformer
from models.volo import VOLO
from tools.visualize import render
from utils.log import setup_logging

_logger = logging.getLogger('doc_pictures')
CLASS_NAMES = ['background', 'red square', 'blue square']
SIZE = 128


def small_volo():
    return VOLO(layers=[2, 2, 2, 2], img_size=SIZE, num_classes=3, stem_hidden_dim=32, embed_dims=[64, 128, 128, 128],
                num_heads=[2, 4, 4, 4], mlp_ratios=[2, 2, 2, 2], downsamples=[True, False, False, False],
                outlook_attention=[True, False, False, False], post_layers=['ca', 'ca'])


def small_visformer():
    return Visformer(img_size=SIZE, num_classes=3, init_channels=16, stage_dims=(48, 96, 192), depths=(1, 2, 2),
                     num_heads=(2, 4, 4))


def normalise(images):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (images - mean) / std


def train(model, steps, generator, dense):
    """AdamW on batches of 16 fresh scenes: the image's class (the class token's head), and for a
    VOLO each token's class through aux_head."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    for step in range(steps):
        images, tokens, classes = object_scenes(16, SIZE, generator=generator)
        features = model.forward_features(normalise(images))
        loss = F.cross_entropy(model.forward_head(features), classes)
        if dense:
            loss = loss + F.cross_entropy(model.aux_head(features[:, 1:]).reshape(-1, 3), tokens.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            _logger.info('%s step %d: loss %.3f', type(model).__name__, step, loss.item())
    return model.eval()


def example_scene(generator):
    """Dim noise with a red square of side 44 in the top-left corner, as the training scenes are drawn."""
    image = torch.rand(3, SIZE, SIZE, generator=generator) * 0.3
    image[:, 8:52, 8:52] = 0.1
    image[0, 8:52, 8:52] = 1.0
    return image


def main(argv=None):
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join('docs', 'pictures'))
    p.add_argument('--steps', type=int, default=300)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    volo = train(small_volo(), args.steps, generator, dense=True)
    visformer = train(small_visformer(), args.steps, generator, dense=False)
    scene = example_scene(generator)
    os.makedirs(args.out, exist_ok=True)
    Image.fromarray((scene.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(os.path.join(args.out, 'scene.png'))
    written = []
    for name, model in (('volo', volo), ('visformer', visformer)):
        written += render(model, normalise(scene), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, CLASS_NAMES,
                          os.path.join(args.out, name), at=(1, 1) if name == 'volo' else (0, 0))
    for path in written:
        _logger.info('wrote %s', path)
    return written


if __name__ == '__main__':
    main()
