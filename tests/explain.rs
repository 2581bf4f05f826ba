//! `la-cli gradcam` and `la-cli attention-map` end to end on a model trained on the digits:
//! every CAM method and metric from the command line, pictures at the image's own
//! resolution, and clear errors.

mod support;

use std::path::{Path, PathBuf};

use support::{la_cli, stderr, stdout, train_tiny_digits};

/// A 300x200 picture with some structure (a bright disc on a gradient).
fn wide_png(dir: &Path) -> PathBuf {
    let img = image::RgbImage::from_fn(300, 200, |x, y| {
        let (dx, dy) = (x as f32 - 150.0, y as f32 - 100.0);
        let disc = if dx * dx + dy * dy < 60.0 * 60.0 {
            200
        } else {
            0
        };
        image::Rgb([disc as u8, (y / 4) as u8, (x / 6) as u8])
    });
    let path = dir.join("wide.png");
    img.save(&path).unwrap();
    path
}

fn train_tiny(runs: &Path) -> PathBuf {
    let out = train_tiny_digits(runs);
    assert!(out.status.success(), "{}", stderr(&out));
    runs.join("tiny/best.safetensors")
}

#[test]
fn every_method_and_metric_runs_and_draws_over_the_original_image() {
    let tmp = la_testing::tempdir("cli-explain");
    let dir = tmp.path();
    let weights = train_tiny(&dir.join("runs"));
    let weights = weights.to_str().unwrap();
    let png = wide_png(dir);
    let cam = dir.join("cam.png");
    let args = [
        "gradcam",
        "--weights",
        weights,
        "--image",
        png.to_str().unwrap(),
        "--method",
        "all",
        "--metric",
        "confidence-change,road-morf,road-lerf=30,road",
        "--block",
        "4",
        "--out",
        cam.to_str().unwrap(),
    ];
    let out = la_cli(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("block 4 (4x4 map)"), "{text}");
    for title in [
        "Grad-CAM ",
        "Grad-CAM++",
        "XGrad-CAM",
        "LayerCAM",
        "HiResCAM",
        "EigenCAM",
        "Score-CAM",
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(title))
            .unwrap_or_else(|| panic!("{title}: {text}"));
        let scores: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(scores.len(), 4, "{line}");
        // Every score is a change in probability (ROAD combined: half a difference of two).
        assert!(scores.iter().all(|s| s.abs() <= 1.0), "{line}");
    }
    // ROAD's noise is seeded: the same command prints the same scores.
    assert_eq!(stdout(&la_cli(&args)), text);

    // The picture: the image and seven maps in rows of four, each panel at the image's own
    // 300x200 pixels, beside a colour bar.
    let picture = image::open(&cam).unwrap().to_rgb8();
    assert_eq!(
        (picture.width(), picture.height()),
        (12 + 4 * (300 + 12) + 72, 34 + 2 * (44 + 200 + 12))
    );
    let original = image::open(&png).unwrap().to_rgb8();
    let panel_origin = |i: u32| (12 + (i % 4) * 312, 34 + (i / 4) * 256 + 44);
    // The model saw the centre 200x200 square; left of it the maps leave the image dimmed.
    for i in 0..8 {
        let (ox, oy) = panel_origin(i);
        for (x, y) in [(10u32, 20u32), (40, 150), (290, 100)] {
            let want = original.get_pixel(x, y).0;
            let want = if i == 0 { want } else { want.map(|c| c / 2) };
            assert_eq!(
                picture.get_pixel(ox + x, oy + y).0,
                want,
                "panel {i} pixel ({x}, {y})"
            );
        }
    }
    // Inside it, the heat map is blended in: some pixel differs from the image.
    let (ox, oy) = panel_origin(1);
    assert!(
        (50..250).any(|x| picture.get_pixel(ox + x, oy + 100).0 != original.get_pixel(x, 100).0)
    );

    let att = dir.join("att.png");
    let out = la_cli(&[
        "attention-map",
        "--weights",
        weights,
        "--image",
        png.to_str().unwrap(),
        "--out",
        att.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for block in 1..=5 {
        assert!(
            text.contains(&format!("block {block}: softmax attention")),
            "{text}"
        );
    }
    let grid = image::open(&att).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (12 + 3 * 312 + 72, 34 + 2 * 256),
        "five blocks in rows of three"
    );
    let out = la_cli(&[
        "attention-map",
        "--weights",
        weights,
        "--image",
        png.to_str().unwrap(),
        "--block",
        "2",
        "--query",
        "8,8",
        "--out",
        att.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("query at pixel (8, 8)"),
        "{}",
        stdout(&out)
    );

    for (flags, message) in [
        (
            vec!["--method", "smooth-grad"],
            "unknown CAM method `smooth-grad`",
        ),
        (vec!["--metric", "road-morf=0"], "between 0 and 100"),
        (
            vec!["--block", "9"],
            "--block 9: the model has blocks 1 to 5",
        ),
        (vec!["--class", "10"], "class 10 does not exist"),
    ] {
        let mut args = vec![
            "gradcam",
            "--weights",
            weights,
            "--image",
            png.to_str().unwrap(),
        ];
        args.extend(flags);
        let out = la_cli(&args);
        assert!(
            !out.status.success() && stderr(&out).contains(message),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    let out = la_cli(&[
        "attention-map",
        "--weights",
        weights,
        "--image",
        png.to_str().unwrap(),
        "--query",
        "40,3",
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("inside the 32x32 input"),
        "{}",
        stderr(&out)
    );
}
