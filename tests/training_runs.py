"""Small training runs for the tests: volo_test (tests/small_models.py: VOLO-D1's code paths, 1% of its
weights) at 32 px (2x2 tokens), 3 steps an epoch. Runs in another process use FAST_D1: volo_test is
registered in the test processes only."""
import main as train_script


def fast_args(model):
    return ['--model', model, '--img-size', '32', '-b', '8', '--warmup-epochs', '0', '--cooldown-epochs', '0',
            '--lr', '5e-4', '-j', '0', '--log-interval', '1', '--aa', '', '--reprob', '0']


FAST = fast_args('volo_test')
FAST_D1 = fast_args('volo_d1')  # for main.py in another process, where volo_test is not registered


def run_fast(data, out, *extra):
    """main.py on `data` with FAST and `extra`; returns the run directory."""
    return train_script.main([data, *FAST, '--output', str(out), *extra])


def copy_with_unreadable_image(data, dest, split, index=0):
    """A copy of the dataset at `dest` whose `index`-th image of `split` is not an image; returns
    (copy root, that file)."""
    import shutil
    shutil.copytree(data, dest)
    victim = sorted((dest / split).rglob('*.png'))[index]
    victim.write_bytes(b'not an image')
    return dest, victim
