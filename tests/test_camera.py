"""Camera labels follow EG3D's LookAt convention."""

from __future__ import annotations

import math

import torch

from my3dgen_cli.eg3d.camera import camera_angles, lookat_cam2world, lookat_camera, mirror_camera


def test_frontal_camera_sits_on_the_sphere_looking_at_the_pivot() -> None:
    c = lookat_camera(0.0, 0.0)
    assert c.shape == (1, 25)
    cam2world = c[0, :16].reshape(4, 4)
    assert torch.allclose(cam2world[:3, 3], torch.tensor([0.0, 0.0, 2.7]), atol=1e-6)
    forward = cam2world[:3, 2]
    to_pivot = torch.tensor([0.0, 0.0, 0.2]) - cam2world[:3, 3]
    assert torch.allclose(forward, to_pivot / to_pivot.norm(), atol=1e-6)
    assert torch.allclose(c[0, 16:], torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1]))


def test_degrees_map_to_the_official_radians() -> None:
    ours = lookat_camera(30.0, 10.0)[0, :16].double()
    official = lookat_cam2world(torch.tensor([math.pi / 2 + math.radians(30)]),
                                torch.tensor([math.pi / 2 - math.radians(10)]))[0].reshape(16)
    assert torch.allclose(ours, official, atol=1e-6)
    assert lookat_camera(30.0, 10.0)[0, 3] > 0  # positive yaw: camera towards +x
    assert lookat_camera(0.0, 10.0)[0, 7] > 0  # positive pitch: camera above the head (world +y is up)


def test_angles_round_trip_and_mirror_negates_yaw() -> None:
    yaw = torch.tensor([-40.0, 0.0, 25.0])
    pitch = torch.tensor([5.0, -10.0, 0.0])
    c = lookat_camera(yaw, pitch)
    got_yaw, got_pitch = camera_angles(c)
    assert torch.allclose(got_yaw, yaw, atol=1e-4) and torch.allclose(got_pitch, pitch, atol=1e-4)
    assert torch.allclose(mirror_camera(c), lookat_camera(-yaw, pitch), atol=1e-6)
