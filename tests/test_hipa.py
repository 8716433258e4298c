"""HiPA: high-frequency operators on known inputs, the loss, the one-step path and the teacher cache."""
import pytest
import torch

from pipelines import hipa
from pipelines.families import family_of
from pipelines.text2image import seeded_generators


def checkerboard(size=8, channels=3, low=0.0, high=1.0):
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = torch.where((i + j) % 2 == 0, torch.tensor(high), torch.tensor(low))
    return board.expand(1, channels, size, size).clone()


def test_constant_image_has_no_high_frequency():
    flat = torch.full((2, 3, 16, 16), 0.7)
    assert hipa.highpass(flat).abs().max() < 1e-6
    assert hipa.hf_energy(flat).abs().max() < 1e-10
    assert hipa.sobel_magnitude(flat).abs().max() < 1e-6
    assert hipa.laplacian(flat).abs().max() < 1e-6


def test_checkerboard_has_the_expected_energy():
    # {0,1} board = 0.5 + 0.5·(-1)^(i+j): all its variation sits at the Nyquist corner (radius 0.707).
    board = checkerboard(8)
    high = hipa.highpass(board)
    assert torch.allclose(high, board - 0.5, atol=1e-6)
    assert torch.allclose(hipa.hf_energy(board), torch.tensor([0.25]), atol=1e-6)
    # Laplacian of ±1 board is -8·board everywhere (reflect padding keeps the borders exact) ...
    signed = checkerboard(8, low=-1.0, high=1.0)
    assert torch.allclose(hipa.laplacian(signed), -8 * signed[:, :1], atol=1e-5)
    # ... while Sobel is blind to it: its x/y taps skip a pixel, and those have the same sign.
    assert hipa.sobel_magnitude(signed).abs().max() < 1e-5


def test_sobel_on_a_step_edge():
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    magnitude = hipa.sobel_magnitude(step)[0, 0]
    assert torch.allclose(magnitude[:, 3:5], torch.full((8, 2), 4.0), atol=1e-4)
    assert magnitude[:, :3].abs().max() < 1e-5 and magnitude[:, 5:].abs().max() < 1e-5


def test_low_cosine_is_low_and_masks_partition_unity():
    x = torch.arange(32, dtype=torch.float32)
    low_cosine = torch.cos(2 * torch.pi * 2 * x / 32).view(1, 1, 1, 32).expand(1, 1, 32, 32)  # 1/16 cycles/pixel
    assert hipa.highpass(low_cosine, cutoff=0.125).abs().max() < 1e-5
    images = torch.randn(2, 3, 16, 12)
    for transition in (0.0, 0.1):
        low, high = hipa.split_frequencies(images, cutoff=0.2, transition=transition)
        assert torch.allclose(low + high, images, atol=1e-5)
        mask = hipa.radial_lowpass_mask(16, 12, 0.2, transition)
        assert mask.min() >= 0 and mask.max() <= 1 and mask[0, 0] == 1


def test_loss_terms_and_knobs():
    teacher = torch.rand(2, 3, 16, 16)
    total, terms = hipa.hipa_loss(teacher.clone(), teacher)
    assert total.item() < 1e-6 and set(terms) >= {"spatial", "fft", "edge"}
    blurred = torch.nn.functional.avg_pool2d(teacher, 3, 1, 1)
    cfg = hipa.HiPALossConfig(spatial_weight=0.0, fft_weight=1.0, edge_weight=0.0)
    total, terms = hipa.hipa_loss(blurred, teacher, cfg)
    assert total.item() == pytest.approx(terms["fft"]) and terms["fft"] > 0
    with pytest.raises(ValueError, match="l1"):
        hipa.HiPALossConfig(spatial="lpips")


@pytest.fixture(scope="module")
def tiny_pipe():
    from pipelines.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_one_step_calls_the_model_once_per_image(tiny_pipe):
    batches = []
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        images = hipa.one_step(tiny_pipe, "a photo of a bag", num_images_per_prompt=3,
                               generator=seeded_generators(4, 3)).images
        assert len(images) == 3 and batches == [3]  # one call, three images, no CFG doubling
        batches.clear()
        hipa.one_step(tiny_pipe, "a photo of a bag", num_images_per_prompt=1)
        assert batches == [1]
    finally:
        hook.remove()
    assert type(tiny_pipe.scheduler).__name__ == "DDIMScheduler"  # the pipeline's own scheduler is back


def test_student_generator_matches_the_one_step_pipeline(tiny_pipe):
    prompts = ["a photo of a bag"] * 2
    latents = hipa.one_step(tiny_pipe, prompts[0], num_images_per_prompt=2, generator=seeded_generators(9, 2),
                            output_type="latent").images
    noise = hipa.seeded_noise(tiny_pipe, 2, seed=9)
    family = family_of(tiny_pipe)
    with torch.no_grad():
        x0 = hipa.student_x0(family, noise, family.encode_text(prompts))
    assert torch.allclose(x0, latents, atol=1e-5)
    # SD's schedule keeps T = 999 (α ≈ 0.068); a cosine schedule (α_999 ≈ 5e-5) moves T to where α ≥ 0.06
    assert hipa.default_timestep(tiny_pipe.scheduler) == 999
    from diffusers import DDIMScheduler

    cosine = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    t = hipa.default_timestep(cosine)
    assert cosine.alphas_cumprod[t] ** 0.5 >= hipa.MIN_SIGNAL > cosine.alphas_cumprod[t + 1] ** 0.5
    with torch.no_grad():  # the pipeline path honours an explicit timestep too
        at_900 = hipa.one_step(tiny_pipe, prompts[0], num_images_per_prompt=2, generator=seeded_generators(9, 2),
                               output_type="latent", timestep=900).images
        x0 = hipa.student_x0(family, noise, family.encode_text(prompts), 900)
    assert torch.allclose(x0, at_900, atol=1e-5)


def test_teacher_cache_resumes(tiny_pipe, tmp_path):
    from studio.hipa import TeacherPairs, build_teacher_cache

    calls = []
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        build_teacher_cache(tiny_pipe, tmp_path, count=3, prompts=["a", "b"], steps=2, shard_size=2, progress=False,
                            stop=lambda: True)  # interrupted after the first shard
        assert len(calls) == 2  # 2 steps, one batched (CFG-doubled) call each
        first = TeacherPairs(tmp_path)
        assert len(first) == 2
        seen = []
        build_teacher_cache(tiny_pipe, tmp_path, count=3, prompts=["a", "b"], steps=2, shard_size=2,
                            progress=lambda done, total: seen.append((done, total)))
        assert len(calls) == 4  # only the missing shard was generated
        assert seen[0] == (2, 3) and seen[-1] == (3, 3)
    finally:
        hook.remove()
    pairs = TeacherPairs(tmp_path)
    assert len(pairs) == 3 and pairs[2]["prompt_index"].item() == 0
    assert torch.equal(pairs[1]["noise"], first[1]["noise"])
    # the stored noise is the seeded noise of pair i; the target is the teacher from it
    assert torch.equal(pairs[2]["noise"], hipa.seeded_noise(tiny_pipe, 1, seed=2)[0])
    again = hipa.teacher_x0(tiny_pipe, ["a"], pairs[2]["noise"][None], steps=2)
    assert torch.allclose(again[0], pairs[2]["target"], atol=1e-5)
    with pytest.raises(ValueError, match="other settings"):
        build_teacher_cache(tiny_pipe, tmp_path, count=3, prompts=["a", "b"], steps=3, shard_size=2, progress=False)


def _fake_run(pipe, folder, **config):
    """What HiPAObjective sees of the loop (studio.train.Run), for a step driven by hand."""
    from types import SimpleNamespace

    from studio.hipa import hipa_config
    from studio.train import TrainConfig

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0,
                                  wait_for_everyone=lambda: None)
    cfg = TrainConfig.from_dict(hipa_config({"out": str(folder), "quiet": True, **config}))
    family = family_of(pipe)
    return SimpleNamespace(config=cfg, pipe=pipe, family=family, denoiser=family.denoiser, device=pipe.device,
                           accelerator=accelerator, folder=SimpleNamespace(path=folder), say=lambda text: None)


def test_one_training_step_lowers_the_loss_and_the_adapter_is_ordinary(tmp_path):
    from adapters import AdapterConfig, attach, save_adapter

    from pipelines.tiny import tiny_sd_pipeline
    from studio.hipa import HiPAObjective

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a bag"
    two = dict(num_images_per_prompt=2, output_type="latent")
    before = hipa.one_step(pipe, prompt, generator=seeded_generators(3, 2), **two).images
    run = _fake_run(pipe, tmp_path, batch_size=4, objective_options={
        "pairs": 4, "teacher_steps": 3, "teacher_guidance": 3.0, "prompts": [prompt, "a photo of a coat"]})
    objective = HiPAObjective()
    report = objective.prepare(run)
    assert report["teacher_pairs"] == 4 and (tmp_path / "teacher" / "manifest.json").is_file()
    pipe.unet.requires_grad_(False)
    handle = attach(pipe.unet, AdapterConfig(method="lora", rank=4, targets="attn"), name=hipa.ADAPTER_NAME)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    first, logs = objective.loss(run, 0, 0)  # batch size 4 = all four pairs, in some order
    assert set(logs) >= {"spatial", "fft", "edge", "latent"}
    first.backward()
    optimizer.step()
    with torch.no_grad():
        second, _ = objective.loss(run, 0, 0)  # the same batch: a step is a pure function of (seed, step)
    assert second.item() < first.item()

    save_adapter(pipe.unet, tmp_path / "hipa", name=hipa.ADAPTER_NAME)
    trained = hipa.one_step(pipe, prompt, generator=seeded_generators(3, 2), **two).images
    # a fresh pipeline: plain 1-step equals the untrained one; with the saved folder it equals the trained one
    fresh = tiny_sd_pipeline()
    fresh.set_progress_bar_config(disable=True)
    plain = hipa.one_step(fresh, prompt, generator=seeded_generators(3, 2), **two).images
    assert torch.allclose(plain, before, atol=1e-6)
    loaded = hipa.one_step(fresh, prompt, adapter=tmp_path / "hipa", generator=seeded_generators(3, 2), **two).images
    assert torch.allclose(loaded, trained, atol=1e-5) and not torch.allclose(loaded, plain, atol=1e-4)
    hipa.drop_adapter(fresh)
    again = hipa.one_step(fresh, prompt, generator=seeded_generators(3, 2), **two).images
    assert torch.allclose(again, plain, atol=1e-6)


def test_training_runs_in_the_shared_loop_and_resumes(tiny_sd_dir, tmp_path):
    import json

    from studio.hipa import train_hipa
    from studio.files import read_jsonl
    from studio.train import run_status

    settings = {"base": str(tiny_sd_dir), "out": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "quiet": True,
                "validation_seeds": [0], "checkpoint_every": 1, "rank": 2,
                "objective_options": {"pairs": 2, "teacher_steps": 2, "prompts": ["a photo of a bag"]}}
    calls = []
    train_hipa(settings, stop=lambda: len(calls) >= 1, progress=lambda e: calls.append(e) if e["type"] == "step" else None)
    assert run_status(tmp_path / "run")["state"] == "stopped"
    run_dir = train_hipa({**settings, "resume": True})
    status = run_status(run_dir)
    assert status["state"] == "done" and status["step"] == 2
    steps = [r["step"] for r in read_jsonl(run_dir / "log.jsonl") if "loss" in r]
    assert steps == [1, 2] and all("fft" in r and "hf_vs_teacher" in r for r in read_jsonl(run_dir / "log.jsonl") if "loss" in r)
    assert (run_dir / "samples" / "step-000000" / "p0-seed0.png").is_file()  # validation = one-step samples
    assert (run_dir / "samples" / "step-000002" / "p0-seed0.png").is_file()
    info = json.loads((run_dir / "adapter" / "hipa.json").read_text())
    assert info["teacher"]["steps"] == 2 and info["teacher_pairs"] == 2 and info["timestep"] == 999
    assert len(hipa.one_step(__import__("pipelines").load_pipeline(str(tiny_sd_dir), device="cpu"), "a photo of a bag",
                             adapter=run_dir / "adapter").images) == 1


@pytest.mark.parametrize("base", ["embedded", "embedded-dit"])
def test_shipped_adapter_runs_on_the_embedded_model(base):
    """Each embedded model's shipped HiPA adapter (pipelines.assets.SHIPPED_HIPA): one batched call, its own base,
    and an image unlike the plain one-step one."""
    import json

    from pipelines import load_pipeline
    from pipelines.assets import assets_dir, shipped_hipa
    from pipelines.families import family_of

    if not (assets_dir() / base / "model_index.json").is_file():
        pytest.skip("the embedded model is not built")
    folder = shipped_hipa(base)
    assert json.loads((folder / "hipa.json").read_text())["base"] == base
    pipe = load_pipeline(base, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    plain = hipa.one_step(pipe, "a photo of a sneaker", num_images_per_prompt=2, output_type="np").images
    batches = []
    hook = family_of(pipe).denoiser.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        images = hipa.one_step(pipe, "a photo of a sneaker", adapter=folder, num_images_per_prompt=2,
                               output_type="np").images
    finally:
        hook.remove()
    assert images.shape == (2, 32, 32, 3) and batches == [2]
    assert type(pipe.scheduler).__name__ == "RefinedUniPCScheduler"  # its own scheduler, restored after the one step
    hipa.drop_adapter(pipe)
    assert abs(images - plain).mean() > 0.01


# ----------------------------------------------------------------------------------------------------
# DiT and flow families: the student is one call at T (PixArt), or one Euler step from σ = 1 (SD3, Flux).

DIT_FAMILIES = {"pixart": "tiny_pixart_pipeline", "sd3": "tiny_sd3_pipeline", "flux": "tiny_flux_pipeline"}


@pytest.mark.parametrize("name", DIT_FAMILIES)
def test_one_step_on_dit_and_flow_families(name):
    import pipelines.tiny as tiny

    pipe = getattr(tiny, DIT_FAMILIES[name])()
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    prompts = ["a photo of a bag"] * 2
    calls = []
    hook = family.denoiser.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        latents = hipa.one_step(pipe, prompts[0], num_images_per_prompt=2, generator=seeded_generators(9, 2), height=32,
                                width=32, output_type="latent").images
    finally:
        hook.remove()
    assert len(calls) == 1 and type(pipe.scheduler).__name__ == type(hipa.base_scheduler(pipe)).__name__
    noise = hipa.seeded_noise(pipe, 2, seed=9, height=32, width=32)
    cond = family.encode_text(prompts)
    with torch.no_grad():
        x0 = hipa.student_x0(family, noise, cond)
        if family.flow:  # one Euler step from pure noise at σ = 1 (timestep 1000): x0 = z − v
            assert torch.allclose(x0, noise - family.predict(noise, 1000.0, cond), atol=1e-6)
    assert torch.allclose(family.unpack(latents, 32, 32), x0, atol=1e-5)
    if family.flow:
        with pytest.raises(ValueError, match="σ = 1"):
            hipa.one_step(pipe, prompts[0], height=32, width=32, timestep=900)


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from pipelines.tiny import tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", DIT_FAMILIES)
def test_studio_hipa_trains_dit_and_flow_families(name, request, tmp_path, capsys):
    import json

    from pipelines import load_pipeline
    from studio.cli import main
    from studio.files import read_jsonl

    base = request.getfixturevalue(f"tiny_{name}_dir")
    run_dir = tmp_path / "run"
    code = main(["hipa", "--base", str(base), "--out", str(run_dir), "--pairs", "2", "--teacher-steps", "2",
                 "--teacher-scheduler", "unipc", "--prompts", "a photo of a bag|a photo of a coat", "--steps", "4",
                 "--batch-size", "2", "--resolution", "32", "--lr", "1e-2", "--warmup-steps", "0", "--rank", "4",
                 "--lr-scheduler", "constant", "--validation-seeds", "0", "--checkpoint-every", "10", "--quiet"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((run_dir / "adapter" / "hipa.json").read_text())
    manifest = json.loads((run_dir / "teacher" / "manifest.json").read_text())
    assert info["family"] == name and info["size"] == 32
    if name == "pixart":  # a VP model: unipc as asked, the student at T
        assert manifest["sampler"] in ("UniPCMultistepScheduler", "RefinedUniPCScheduler") and info["timestep"] < 1000
    else:  # unipc samples noise-prediction models: the flow teacher keeps its own scheduler, the student σ = 1
        assert manifest["scheduler"] == "default" and manifest["sampler"] == "FlowMatchEulerDiscreteScheduler"
        assert info["timestep"] == 1000
    # every step's batch is both fixed pairs: the loss logged at step k is the loss after k - 1 updates
    losses = [r["loss"] for r in read_jsonl(run_dir / "log.jsonl") if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (run_dir / "samples" / "step-000004" / "p0-seed0.png").is_file()  # one-step validation samples

    pipe = load_pipeline(str(base), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    plain = hipa.one_step(pipe, "a photo of a bag", generator=seeded_generators(3, 1), height=32, width=32,
                          output_type="latent").images
    trained = hipa.one_step(pipe, "a photo of a bag", adapter=run_dir / "adapter", generator=seeded_generators(3, 1),
                            output_type="latent").images
    assert trained.shape == plain.shape and not torch.allclose(trained, plain, atol=1e-4)  # at hipa.json's size
    image = hipa.one_step(pipe, "a photo of a bag", adapter=run_dir / "adapter",
                          generator=seeded_generators(3, 1)).images[0]
    assert image.size == (32, 32)
