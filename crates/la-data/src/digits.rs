//! The UCI optical digits (1797 8x8 grey images, 10 classes), embedded in the binary so
//! that examples and tests train on real data without a download. See `data/README.md`
//! for its source and licence.

use std::io::Read;
use std::path::Path;

use crate::in_memory::{InMemory, Planes};
use crate::{Error, Result};

const CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");
const NAME: &str = "<embedded>/digits.csv.gz";
pub const SIDE: usize = 8;
const PIXELS: usize = SIDE * SIDE;

/// The embedded digits, pixels scaled from 0..16 to 0..255.
pub type DigitsDataset = InMemory<()>;

/// Parses a digits CSV (gzip or plain): rows of 64 values 0..16 then a label 0..9.
pub fn parse_digits_csv(bytes: &[u8], name: &Path) -> Result<DigitsDataset> {
    let mut text = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(Error::unreadable(name, "bad gzip or UTF-8"))?;
    } else {
        text = String::from_utf8(bytes.to_vec())
            .map_err(|e| Error::format(name, format!("not UTF-8: {e}")))?;
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| Error::format(name, format!("line {}: {what}", line_no + 1));
        let values: Vec<&str> = line.split(',').map(str::trim).collect();
        if values.len() != PIXELS + 1 {
            return Err(bad(format!(
                "{} values, expected {} pixels and a label",
                values.len(),
                PIXELS
            )));
        }
        for (i, v) in values.iter().enumerate() {
            // scikit-learn writes integers, but a float spelling of one is accepted.
            let x: f64 = v
                .parse()
                .map_err(|_| bad(format!("`{v}` is not a number")))?;
            let (max, what) = if i < PIXELS {
                (16.0, "pixel")
            } else {
                (9.0, "label")
            };
            if !(0.0..=max).contains(&x) || x.fract() != 0.0 {
                return Err(bad(format!("{what} `{v}` is not an integer in 0..={max}")));
            }
            if i < PIXELS {
                pixels.push(((x as u32 * 255 + 8) / 16) as u8);
            } else {
                labels.push(x as u8);
            }
        }
    }
    let classes = (0..10).map(|c| c.to_string()).collect();
    let mut ds = InMemory::new((SIDE, SIDE), Planes::Gray, classes, ());
    ds.extend(&pixels, &labels);
    Ok(ds)
}

/// The embedded UCI optical digits: 1797 images of 8x8, classes "0".."9".
pub fn digits() -> Result<DigitsDataset> {
    parse_digits_csv(CSV_GZ, Path::new(NAME))
}
