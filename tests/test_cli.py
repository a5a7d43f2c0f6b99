from __future__ import annotations

import json

import PIL.Image

from clip_diffusionlm.cli import main


def test_caption_command(pipeline, tmp_path, capsys):
    pipeline.save_pretrained(tmp_path / "pipe")
    image_path = tmp_path / "red.png"
    PIL.Image.new("RGB", (32, 32), (255, 0, 0)).save(image_path)
    assert main(["caption", str(image_path), "--model", str(tmp_path / "pipe"), "--steps", "3"]) == 0
    path, caption = capsys.readouterr().out.strip().split("\t")
    assert path == str(image_path)
    expected = pipeline(PIL.Image.open(image_path), num_inference_steps=3,
                        generator=__import__("torch").Generator().manual_seed(0)).captions[0]
    assert caption == expected
    assert main(["caption", str(image_path), "--model", str(tmp_path / "pipe"), "--steps", "3",
                 "--no-repeat-ngram-size", "1"]) == 0
    no_word_twice = pipeline(PIL.Image.open(image_path), num_inference_steps=3, no_repeat_ngram_size=1,
                             generator=__import__("torch").Generator().manual_seed(0)).captions[0]
    assert no_word_twice != expected  # the untrained tiny model repeats its words
    assert capsys.readouterr().out.strip().split("\t")[1] == no_word_twice
    assert main(["caption", str(image_path), "--model", str(tmp_path / "pipe"), "--steps", "3",
                 "--length-bonus", "-50"]) == 0
    ended_early = pipeline(PIL.Image.open(image_path), num_inference_steps=3, length_bonus=-50,
                           generator=__import__("torch").Generator().manual_seed(0)).captions[0]
    assert len(ended_early.split()) < len(expected.split())
    assert capsys.readouterr().out.rstrip("\n").split("\t")[1] == ended_early

    assert main(["caption", str(image_path), "--model", str(tmp_path / "pipe"), "--json", "--num-captions", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == str(image_path) and len(record["captions"]) == 2


def test_caption_command_reports_bad_input(pipeline, tmp_path, capsys):
    pipeline.save_pretrained(tmp_path / "pipe")
    assert main(["caption", str(tmp_path / "missing.png"), "--model", str(tmp_path / "pipe")]) == 2
    assert "missing.png" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["caption", str(broken), "--model", str(tmp_path / "pipe")]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    image_path = tmp_path / "ok.png"
    PIL.Image.new("RGB", (8, 8)).save(image_path)
    assert main(["caption", str(image_path), "--model", str(tmp_path / "no-pipeline")]) == 2
    assert "no-pipeline" in capsys.readouterr().err
    assert main(["caption", str(image_path), "--model", str(tmp_path / "pipe"), "--steps", "0"]) == 2
    assert "num_inference_steps" in capsys.readouterr().err
    assert main(["caption", str(image_path), "--model", str(tmp_path / "pipe"), "--no-repeat-ngram-size", "-1"]) == 2
    assert "no_repeat_ngram_size" in capsys.readouterr().err
    assert main(["caption", str(image_path), "--model", str(tmp_path / "pipe"), "--length-bonus", "nan"]) == 2
    assert "length_bonus" in capsys.readouterr().err


def test_train_and_evaluate_commands_forward_their_flags(training_assets, tmp_path, capsys):
    config = {
        "datasets": [str(training_assets["world"])], "clip_model": str(training_assets["clip"]),
        "text_backbone": str(training_assets["backbone"]), "model_config": {"caption_length": 12},
        "batch_size": 8, "validation_steps": 0, "checkpointing_steps": 0, "report_to": "none",
    }
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--max_steps", "2", "--output_dir", str(run)]) == 0
    assert (run / "model_index.json").exists()
    assert main(["evaluate", "--model", str(run), "--datasets", str(training_assets["world"]),
                 "--output_dir", str(tmp_path / "eval"), "--num_inference_steps", "2"]) == 0
    assert "| steps | guidance |" in capsys.readouterr().out
    assert main(["train", "--config", str(config_file), "--lr_schedule", "bogus"]) == 2
    assert "lr_schedule" in capsys.readouterr().err
