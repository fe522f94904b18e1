//! Latency percentile curves as SVG: Eventplane beside its reference, one
//! file per comparison. The x axis counts nines (0 = P0, 2 = P99,
//! 3 = P99.9), so the tail gets the room it deserves.

use std::path::Path;

use plotters::prelude::*;

pub struct Curve<'a> {
    pub label: String,
    /// (percentile, microseconds)
    pub points: &'a [(f64, u64)],
}

fn nines(percentile: f64) -> f64 {
    let rest = (100.0 - percentile).max(0.01) / 100.0;
    -rest.log10()
}

pub fn write(path: &Path, title: &str, curves: &[Curve]) -> anyhow::Result<()> {
    let max_ms = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|(_, us)| *us as f64 / 1000.0))
        .fold(0.0_f64, f64::max)
        .max(0.1);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..4.0_f64, 0.0..max_ms * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "P0".into(),
            1 => "P90".into(),
            2 => "P99".into(),
            3 => "P99.9".into(),
            4 => "P99.99".into(),
            _ => String::new(),
        })
        .x_labels(5)
        .draw()?;
    let colours = [RED, BLUE, GREEN, MAGENTA];
    for (curve, colour) in curves.iter().zip(colours.iter().cycle()) {
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(
                curve
                    .points
                    .iter()
                    .filter(|(p, _)| *p < 100.0)
                    .map(|(p, us)| (nines(*p), *us as f64 / 1000.0)),
                colour.stroke_width(2),
            ))?
            .label(curve.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_count_the_leading_nines() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(0.0), 0.0);
    }

    #[test]
    fn a_plot_names_both_curves() {
        let dir = std::env::temp_dir().join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        let a = [(50.0, 1000), (99.0, 5000)];
        let b = [(50.0, 800), (99.0, 2000)];
        write(
            &path,
            "appends",
            &[
                Curve {
                    label: "eventplane".into(),
                    points: &a,
                },
                Curve {
                    label: "pgbench".into(),
                    points: &b,
                },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("eventplane") && svg.contains("pgbench"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
