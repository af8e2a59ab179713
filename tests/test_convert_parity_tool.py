"""tools/check_mmseg_parity.py's densefuse side on files in the layout its mmseg side writes (built here from a
densefuse model under mmseg's names, so no mmseg is needed): every key loads, the logits agree."""
import importlib.util
from pathlib import Path

import torch

from densefuse.config import load_config
from densefuse.convert import to_mmseg_state_dict
from densefuse.model import build_model

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("check_mmseg_parity", ROOT / "tools" / "check_mmseg_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parity_check_reads_mmseg_layout_files(tmp_path):
    tool = _tool()
    row = "FCN R50-D8"
    config = ROOT / "configs" / "seg" / "paper" / f"{tool.ROWS[row][1]}.yaml"
    cfg = load_config(str(config), ["model.encoder.pretrained=null", "model.num_classes=3",
                                    "model.equalizer.mode=off"])
    torch.manual_seed(0)
    src = build_model(cfg).eval()
    with torch.no_grad():
        for name, t in src.state_dict().items():  # non-trivial norms, as the mmseg side makes them
            if t.is_floating_point() and t.ndim == 1 and "equalizer" not in name:
                t.copy_(torch.rand(t.shape) + 0.5)
    mm = to_mmseg_state_dict(src)
    torch.save({"meta": {}, "state_dict": mm}, tmp_path / "0_segmentor.pth")
    torch.save({k[len("backbone."):]: v for k, v in mm.items() if k.startswith("backbone.")},
               tmp_path / "0_backbone.pth")
    sizes = [(48, 64), (47, 65)]  # one file per size; the odd one as the padding checks run it
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            torch.save({"input": x, "logits": src(x)["out"], "feats": src.encoder(x)}, tmp_path / f"0_{h}x{w}_io.pth")
    results = tool.check_row(row, "0", tmp_path, 3, sizes)
    assert [r["size"] for r in results] == ["48x64", "47x65"]
    for res in results:
        assert res["argmax_agreement"] == 1.0
        assert res["logit_max_abs_diff"] < 1e-4 and res["backbone_max_abs_diff"] < 1e-4
        assert res["backbone_levels"] == "4/4"
    assert results[1]["backbone_grids"] == "12x17 6x9 6x9 6x9"  # stride 4, then 8 (D8)
