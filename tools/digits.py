#!/usr/bin/env python3
"""Real images for a quick check that training learns: scikit-learn's handwritten digits (1,797 scans
of 8x8 pixels, 16 grey levels, shipped inside the scikit-learn package, nothing downloaded) written as
an ImageNet-style folder, with a fixed stratified held-out split, for main.py and validate.py.

    python -m tools.digits digits_data                  # digits_data/{train,val}/<0..9>/NNNN.png, 32 px
    python -m tools.digits digits_data --baseline       # also: classical classifiers on the raw 8x8 pixels

Each image is upscaled from 8x8 to --size pixels (nearest: the scan's own pixels, enlarged) and saved as
a greyscale PNG named by its index in sklearn.datasets.load_digits(). The split takes --val-fraction
of every class, drawn with --seed (default 20% and seed 0: 1,438 training and 359 held-out images);
split.json lists it. A folder already written with the same settings is left as it is.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from engine import DiskFullError, save_image, write_atomically

SPLIT_FILE = 'split.json'


def load_digits():
    """(images (1797, 8, 8) of 0..16, labels (1797,)) from scikit-learn's copy of the UCI digits."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise SystemExit('tools.digits needs the scikit-learn package: pip install scikit-learn') from None
    digits = sklearn_digits()
    return digits.images, digits.target


def stratified_split(labels, val_fraction=0.2, seed=0):
    """(train indices, val indices), both sorted: round(val_fraction * n) of each class's n images
    held out, drawn with numpy's generator seeded with `seed` (the same on every machine)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f'--val-fraction {val_fraction}: the held-out share of each class, between 0 and 1')
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        val += rng.permutation(members)[:int(round(val_fraction * len(members)))].tolist()
    val = np.sort(np.array(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def digit_image(pixels, size):
    """One 8x8 scan (0..16) as a greyscale PIL image of size x size, each scan pixel a square."""
    grey = np.round(np.asarray(pixels, dtype=np.float64) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(grey).resize((size, size), Image.NEAREST)


def write_digits_folder(root, size=32, val_fraction=0.2, seed=0):
    """root/train/<digit>/NNNN.png and root/val/<digit>/NNNN.png (NNNN: the index in load_digits()),
    every PNG written atomically, then root/split.json (the settings and the held-out indices), which
    marks the folder complete. Returns root. A folder completed with the same settings is left as it is;
    one with other settings, or train/ or val/ folders of something else, is refused in one line."""
    if not 8 <= size <= 1024:
        raise ValueError(f'--size {size}: from 8 to 1024 pixels')
    settings = {'size': size, 'val_fraction': val_fraction, 'seed': seed}
    marker = os.path.join(root, SPLIT_FILE)
    if os.path.isfile(marker):
        with open(marker) as f:
            written = json.load(f)
        if written.get('settings') == settings:
            return root
        raise ValueError(f'{root} holds the digits written with {written.get("settings")}, not {settings}: '
                         f'choose another folder')
    for split in ('train', 'val'):
        folder = os.path.join(root, split)
        if os.path.isdir(folder) and any(not name.isdigit() for name in os.listdir(folder)):
            raise ValueError(f'{folder} holds other folders than the digits 0-9: choose another folder')
    images, labels = load_digits()
    train, val = stratified_split(labels, val_fraction, seed)
    for split, indices in (('train', train), ('val', val)):
        for c in range(10):
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
        for i in indices:
            save_image(digit_image(images[i], size), os.path.join(root, split, str(labels[i]), f'{i:04d}.png'))
    record = {'source': 'sklearn.datasets.load_digits', 'settings': settings, 'train_images': len(train),
              'val_images': len(val), 'val_indices': val.tolist()}
    write_atomically(marker, (json.dumps(record, indent=1) + '\n').encode())
    return root


def baseline_accuracies(val_fraction=0.2, seed=0):
    """{name: held-out accuracy (percent)} of two classical classifiers of scikit-learn with their
    default settings, on the raw 8x8 pixels (64 features scaled to 0..1), trained on the folder's split:
    logistic regression and an RBF support-vector classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC
    images, labels = load_digits()
    train, val = stratified_split(labels, val_fraction, seed)
    features = images.reshape(len(images), -1) / 16.0
    classifiers = {'logistic regression': LogisticRegression(max_iter=5000), 'SVC (RBF kernel)': SVC()}
    return {name: 100.0 * c.fit(features[train], labels[train]).score(features[val], labels[val])
            for name, c in classifiers.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('root', help='the folder to write (train/, val/, split.json)')
    p.add_argument('--size', type=int, default=32, help='image side in pixels (default 32)')
    p.add_argument('--val-fraction', type=float, default=0.2, help='held-out share of each class (default 0.2)')
    p.add_argument('--seed', type=int, default=0, help='the split\'s seed (default 0)')
    p.add_argument('--baseline', action='store_true',
                   help='also print the held-out accuracy of logistic regression and an SVC on the raw 8x8 pixels')
    args = p.parse_args(argv)
    try:
        write_digits_folder(args.root, args.size, args.val_fraction, args.seed)
    except (ValueError, DiskFullError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    with open(os.path.join(args.root, SPLIT_FILE)) as f:
        record = json.load(f)
    print(f'{args.root}: {record["train_images"]} training and {record["val_images"]} held-out digits '
          f'at {args.size} px (train/, val/)')
    if args.baseline:
        for name, accuracy in baseline_accuracies(args.val_fraction, args.seed).items():
            print(f'{name} on the raw 8x8 pixels: held-out accuracy {accuracy:.2f}%')
    return 0


if __name__ == '__main__':
    sys.exit(main())
