"""What a fresh interpreter in the repository root sees when it imports timm, then this repository,
then runs a tool as `python -m` does, for the tests of import side effects (tests/test_structure.py,
tests/test_timm_api.py). It runs once per test process: an interpreter costs about 10 s of CPU
here."""
import functools
import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repository_modules():
    """The packages and top-level scripts of the repository (tests and pytest's conftest aside)."""
    packages = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, '*', '__init__.py'))]
    scripts = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, '*.py'))]
    return sorted(set(packages + scripts) - {'tests', 'conftest'})


_PROBE = r'''
import contextlib, io, json, runpy, sys, warnings
import timm
from timm.data import auto_augment
from timm.models import _registry

timm_ops = dict(auto_augment.NAME_TO_OP)
report = {}
with warnings.catch_warnings():
    warnings.simplefilter('error')
    keys = ('url', 'hf_hub_id', 'input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes',
            'classifier', 'first_conv')
    cfg = lambda: {k: getattr(timm.models.get_pretrained_cfg('visformer_small.in1k'), k) for k in keys}
    timms_cfg = cfg()
    report['before'] = timm.list_pretrained('visformer*')
    import models
    report.update(after=timm.list_pretrained('visformer*'), same_cfg=cfg() == timms_cfg,
                  volo=timm.list_pretrained('volo_d?.*'),
                  hub=timm.get_pretrained_cfg_value('visformer_small', 'hf_hub_id'),
                  modules={m: _registry._model_to_module[m] for m in models.MINDCV_MODELS})
for name in sys.argv[1:]:
    __import__(name)
report['timm_ops_unchanged'] = auto_augment.NAME_TO_OP == timm_ops
sys.argv, out = ['generate_token_labels', '--help'], io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module('tools.generate_token_labels', run_name='__main__', alter_sys=True)
    except SystemExit as e:
        report['tool_exit'] = e.code
report['tool_output'] = out.getvalue()
print('REPORT', json.dumps(report))
'''


@functools.lru_cache(maxsize=None)
def fresh_import_report():
    """The probe's findings: timm's visformer tags and config before and after `import models`
    (warnings are errors until then), the VOLO tags, the MindCV models' registry modules, whether
    importing every package and script left timm's augmentation ops as they were, and the exit code
    and output of `tools.generate_token_labels --help` run as a module."""
    done = subprocess.run([sys.executable, '-c', _PROBE, *repository_modules()], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.rsplit('REPORT ', 1)[1])
