"""Ground embedding: closed forms, an independent ray-plane intersection and GEDepth's LiDAR-plane formula."""
import math

import numpy as np
import pytest
import torch
from densefuse_tasks.depth import (
    adapt_ground,
    ground_depth,
    inverse_ground,
    pitched_normal,
    read_kitti_calib,
    slope_targets,
)

from densefuse.errors import DataError

# KITTI 2011_09_26 calibration, in the files' own format
CAM_TO_CAM = """calib_time: 09-Jan-2012 13:57:47
corner_dist: 9.950000e-02
S_00: 1.392000e+03 5.120000e+02
K_00: 9.842439e+02 0.000000e+00 6.900000e+02 0.000000e+00 9.808141e+02 2.331966e+02 0.000000e+00 0.000000e+00 1.000000e+00
R_00: 1.000000e+00 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00
T_00: 2.573699e-16 -1.059758e-16 1.614870e-16
S_rect_00: 1.242000e+03 3.750000e+02
R_rect_00: 9.999239e-01 9.837760e-03 -7.445048e-03 -9.869795e-03 9.999421e-01 -4.278459e-03 7.402527e-03 4.351614e-03 9.999631e-01
P_rect_00: 7.215377e+02 0.000000e+00 6.095593e+02 0.000000e+00 0.000000e+00 7.215377e+02 1.728540e+02 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00
S_rect_02: 1.242000e+03 3.750000e+02
R_rect_02: 9.998817e-01 1.511453e-02 -2.841595e-03 -1.511724e-02 9.998853e-01 -9.338510e-04 2.827154e-03 9.766976e-04 9.999955e-01
P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03
"""
VELO_TO_CAM = """calib_time: 15-Mar-2012 11:37:16
R: 7.533745e-03 -9.999714e-01 -6.166020e-04 1.480249e-02 7.280733e-04 -9.998902e-01 9.998621e-01 7.523790e-03 1.480755e-02
T: -4.069766e-03 -7.631618e-02 -2.717806e-01
delta_f: 0.000000e+00 0.000000e+00
delta_c: 0.000000e+00 0.000000e+00
"""


def write_calib(folder, cam=CAM_TO_CAM, velo=VELO_TO_CAM):
    folder.mkdir(parents=True, exist_ok=True)
    if cam is not None:
        (folder / "calib_cam_to_cam.txt").write_text(cam)
    if velo is not None:
        (folder / "calib_velo_to_cam.txt").write_text(velo)
    return folder


def test_level_camera_closed_form():
    f, cx, cy, h = 100.0, 31.5, 20.3, 1.5
    K = torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    G = ground_depth(K, (0.0, 1.0, 0.0), h, (60, 64))
    v = torch.arange(60, dtype=torch.float64)[:, None].expand(60, 64)
    want = h * f / (v - cy)
    below = (v > cy) & (want <= 200)
    assert torch.allclose(G[below].double(), want[below], rtol=1e-6)
    assert (G[v <= cy] == 0).all()  # at and above the horizon
    assert (G[(v > cy) & (want > 200)] == 0).all()  # beyond 200 m
    assert G.shape == (60, 64) and G.dtype == torch.float32


def test_pitched_camera_matches_ray_plane_intersection():
    H, W, f, h, pitch = 48, 80, 70.0, 1.65, 4.0
    K = np.array([[f, 0, 39.5], [0, f, 18.0], [0, 0, 1.0]])
    G = ground_depth(torch.from_numpy(K), pitched_normal(pitch), h, (H, W)).double().numpy()
    # world: x right, y down, z forward, camera at the origin looking down by `pitch`, ground plane y = h
    p = math.radians(pitch)
    cam_to_world = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    assert np.allclose(cam_to_world @ [0, 0, 1], [0, math.sin(p), math.cos(p)])  # forward tilts down
    want = np.zeros((H, W))
    for v in range(H):
        for u in range(W):
            ray = cam_to_world @ np.linalg.solve(K, [u, v, 1.0])
            if ray[1] <= 0:
                continue
            point = ray * (h / ray[1])  # on the plane y = h
            z = (cam_to_world.T @ point)[2]  # depth along the optical axis
            want[v, u] = z if 0 < z <= 200 else 0
    assert np.allclose(G, want, rtol=1e-6, atol=1e-6)
    # the principal point's ray meets the ground at h / sin(pitch) metres along the axis
    assert G[18, 40] == pytest.approx(h / math.sin(p), rel=2e-2)
    assert (G[:5] == 0).all()  # sky rows of a slightly pitched camera


def test_kitti_calib_matches_gedepth_lidar_plane_formula(tmp_path):
    cam = read_kitti_calib(write_calib(tmp_path / "2011_09_26"), lidar_plane=1.65)
    H, W = 375, 1242
    G = cam.ground((H, W)).double().numpy()
    # GEDepth (tools/preprocess_data_kitti.py): A = P2 R_rect Tr, plane z_velo = -1.65
    vals = {}
    for line in (CAM_TO_CAM + VELO_TO_CAM).splitlines():
        k, _, rest = line.partition(":")
        if k != "calib_time":  # the only entry that is not a list of numbers
            vals[k] = np.array([float(x) for x in rest.split()])
    P2 = vals["P_rect_02"].reshape(3, 4)
    Rr = np.eye(4)
    Rr[:3, :3] = vals["R_rect_00"].reshape(3, 3)
    Tr = np.eye(4)
    Tr[:3, :3], Tr[:3, 3] = vals["R"].reshape(3, 3), vals["T"]
    A = P2 @ Rr @ Tr
    Minv = np.linalg.inv(A[:, :3])
    c = Minv @ A[:, 3]
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    ref = (c[2] - 1.65) / (Minv[2, 0] * u + Minv[2, 1] * v + Minv[2, 2])
    ok = (ref > 0) & (ref <= 200)
    assert ok.mean() > 0.4  # the lower half of the image sees the road
    assert np.allclose(G[ok], ref[ok], rtol=1e-4)
    strict = (ref > 1e-3) & (ref < 199.9) | (ref < -1e-3)
    assert ((G > 0) == ok)[strict].all()
    assert cam.height == pytest.approx(1.65 - c[2])


def test_missing_calib_file_or_line_is_a_clear_data_error(tmp_path):
    with pytest.raises(DataError, match="calib_velo_to_cam.txt"):
        read_kitti_calib(write_calib(tmp_path / "a", velo=None))
    with pytest.raises(DataError, match=r"calib_cam_to_cam.txt.*P_rect_02"):
        bad = "\n".join(line for line in CAM_TO_CAM.splitlines() if not line.startswith("P_rect_02"))
        read_kitti_calib(write_calib(tmp_path / "b", cam=bad))
    with pytest.raises(DataError, match=r"calib_velo_to_cam.txt.*'T:'"):
        bad = "\n".join(line for line in VELO_TO_CAM.splitlines() if not line.startswith("T:"))
        read_kitti_calib(write_calib(tmp_path / "c", velo=bad))


def test_slope_round_trip():
    """A pixel on a ground tilted by k gives the slope class of k; adapting G by it gives the true depth."""
    inv = torch.tensor([[1 / 5.0, 1 / 10.0, 1 / 20.0, 0.0, -0.01]])
    k_deg = torch.full_like(inv, 3.0)
    Ga = adapt_ground(inv, k_deg, 1.65)
    cls = slope_targets(Ga, inv, 1.65)
    assert cls[0, :4].tolist() == [8, 8, 8, 8]  # +3 degrees -> bin 5 + 3
    assert Ga[0, 3] == pytest.approx(1.65 / math.tan(math.radians(3.0)))  # at the flat horizon
    # above the horizon (1/G < 0) the uphill plane is further away than at the horizon
    assert Ga[0, 4] == pytest.approx(1 / (-0.01 + math.tan(math.radians(3.0)) / 1.65))
    assert slope_targets(torch.zeros(1, 2), torch.ones(1, 2), 1.65).tolist() == [[255, 255]]


def _gedepth_adaptive(pe_comput: np.ndarray, slope_deg: np.ndarray, h: float = 1.65, depth_scale: float = 200):
    """GEDepth's ``DepthEncoderDecoder.dynamic_pe`` (pe_mask before the attention product), transcribed:
    ``pe_comput`` is the unclipped ``pe_165`` map, the 5th input channel."""
    k = np.tan(np.deg2rad(slope_deg))
    a = -h / (pe_comput + 1e-8)
    off = -h / ((a - k) + 1e-8)
    m = off.copy()
    m[m < 0] = 0
    m[m > depth_scale] = 0
    m[m > 0] = 1
    return off * m


@pytest.mark.parametrize("slope", [5.0, 2.0, -3.0, 0.0])
def test_adaptive_ground_equals_gedepth_above_and_below_the_horizon(tmp_path, slope):
    """On the real 2011_09_26 calibration (files in KITTI's format) densefuse's adaptive ground from the
    unclipped 1/G equals GEDepth's formula on its unclipped map, above and below the horizon; only a thin
    band above the horizon bends into ground, the sky stays without ground depth."""
    cam = read_kitti_calib(write_calib(tmp_path / "2011_09_26"), lidar_plane=1.65)
    H, W = 375, 1242
    inv = cam.inverse_ground((H, W))
    assert torch.equal(inv, inverse_ground(cam.K, cam.normal, cam.height, (H, W)))
    pe_165 = 1.0 / inv.double().numpy()  # GEDepth's unclipped map: h'/denom, negative above the horizon
    theta = np.full((H, W), slope)
    want = _gedepth_adaptive(pe_165, theta)
    got = adapt_ground(inv[None, None], torch.full((1, 1, H, W), slope), 1.65)[0, 0].double().numpy()
    # away from the 200 m cut-off (a float32 rounding there decides in or out)
    clear = np.abs(want - 200) > 0.5
    assert np.allclose(got[clear], want[clear], rtol=1e-4, atol=1e-4)
    above = inv.numpy() < 0
    assert above.sum() > 200_000  # the rows above the horizon of a 375x1242 frame
    band = (got > 0) & above
    if slope > 0.5:
        rows = np.nonzero(band.any(1))[0]
        assert 0 < len(rows) < 80 and band.sum() < 0.35 * above.sum()  # a band, not the sky (5 deg: rows 120-186)
        assert (got[:rows.min()] == 0).all()
    else:
        assert not band.any()
    # the slope targets invert it: GT depth on a slope-k ground gives class k (where it is ground)
    depth = torch.from_numpy(got).float()[None, None]
    cls = slope_targets(depth, inv[None, None], 1.65)
    on = (depth > 1) & (depth < 80)
    assert (cls[on] == int(round(slope)) + 5).all()
