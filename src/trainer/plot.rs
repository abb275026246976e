//! `RUN_DIR/plot.png`: training reward (mean per step, with accuracy) and validation
//! accuracy against steps, drawn from `metrics.jsonl` with plotters. Text uses the DejaVu font
//! embedded through the `dejavu` crate, so no system font is needed.

use crate::error::{Error, Result};
use crate::trainer::metrics::{read_records, Record};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration only fails on a malformed font; the embedded one is fixed.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draws `run_dir/plot.png` from `run_dir/metrics.jsonl`; returns the PNG's path.
pub fn plot_run(run_dir: &Path) -> Result<PathBuf> {
    let metrics = run_dir.join("metrics.jsonl");
    let records = read_records(&metrics)?;
    if records.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no records to plot (expected the JSON lines of an `rft train` run)",
            metrics.display()
        )));
    }
    let out = run_dir.join("plot.png");
    draw(&records, &out).map_err(|e| Error::invalid(format!("plotting {}: {e}", out.display())))?;
    Ok(out)
}

type Series = Vec<(f64, f64)>;

fn draw(records: &[Record], out: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    register_font();
    let mut reward: Series = Vec::new();
    let mut train_acc: Series = Vec::new();
    let mut val_acc: Series = Vec::new();
    let mut val_reward: Series = Vec::new();
    for r in records {
        match r {
            Record::Train(t) => {
                reward.push((t.step as f64, t.reward_mean));
                train_acc.push((t.step as f64, t.accuracy));
            }
            Record::Eval(e) => {
                val_acc.push((e.step as f64, e.accuracy));
                val_reward.push((e.step as f64, e.reward_mean));
            }
        }
    }
    let max_step = reward.iter().chain(&val_acc).map(|p| p.0).fold(1.0, f64::max);
    let y_max = reward.iter().chain(&val_reward).map(|p| p.1).fold(1.0, f64::max);
    let y_min = reward.iter().chain(&val_reward).map(|p| p.1).fold(0.0, f64::min);

    let root = BitMapBackend::new(out, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let font = ("sans-serif", 16);

    let mut c = ChartBuilder::on(&left)
        .caption("Training reward", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..max_step, y_min..y_max * 1.02)?;
    c.configure_mesh()
        .x_desc("step")
        .y_desc("reward")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(font)
        .draw()?;
    // Per-step rewards are noisy (a few dozen samples each): draw them faintly and their
    // moving average (over ~1/40 of the run) on top.
    let light = RGBColor(170, 185, 235);
    c.draw_series(LineSeries::new(reward.iter().copied(), light.stroke_width(1)))?
        .label("reward mean per step")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], light));
    let window = (reward.len() / 40).max(1);
    c.draw_series(LineSeries::new(
        moving_average(&reward, window),
        BLUE.stroke_width(3),
    ))?
    .label(format!("moving average ({window} steps)"))
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(3)));
    c.draw_series(LineSeries::new(
        moving_average(&train_acc, window),
        GREEN.stroke_width(2),
    ))?
    .label("train accuracy (moving average)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], GREEN.stroke_width(2)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(font)
        .draw()?;

    let mut c = ChartBuilder::on(&right)
        .caption("Validation (greedy)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..max_step, 0.0..1.0)?;
    c.configure_mesh()
        .x_desc("step")
        .y_desc("accuracy")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(font)
        .draw()?;
    c.draw_series(LineSeries::new(val_acc.iter().copied(), RED.stroke_width(2)))?
        .label("validation accuracy")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
    c.draw_series(val_acc.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    c.draw_series(LineSeries::new(
        val_reward.iter().copied(),
        MAGENTA.stroke_width(1),
    ))?
    .label("validation reward")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], MAGENTA));
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(font)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Trailing mean over `window` points.
fn moving_average(s: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(s.len());
    let mut sum = 0.0;
    for i in 0..s.len() {
        sum += s[i].1;
        if i >= window {
            sum -= s[i - window].1;
        }
        out.push((s[i].0, sum / (i + 1).min(window) as f64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::metrics::{EvalRecord, MetricsLog, TrainRecord};

    #[test]
    fn plot_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path()).unwrap();
        for s in 0..5 {
            let t = TrainRecord {
                step: s + 1,
                reward_mean: 0.1 * s as f64,
                accuracy: 0.05 * s as f64,
                ..Default::default()
            };
            log.write(&Record::Train(t)).unwrap();
            let e = EvalRecord {
                step: s,
                accuracy: 0.1 + 0.1 * s as f64,
                reward_mean: 0.2,
                ..Default::default()
            };
            log.write(&Record::Eval(e)).unwrap();
        }
        let ma = moving_average(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)], 2);
        assert_eq!(ma, vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]);
        let p = plot_run(dir.path()).unwrap();
        let bytes = std::fs::read(p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 5_000,
            "a plot with text and lines is not tiny: {}",
            bytes.len()
        );
    }
}
