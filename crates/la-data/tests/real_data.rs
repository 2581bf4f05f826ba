//! Real data: Fashion-MNIST as the Debian package `dataset-fashion-mnist` installs it
//! (`apt-get install -y dataset-fashion-mnist`), and the embedded digits.

use std::path::Path;

use la_data::idx::{FASHION_MNIST_CLASSES, FASHION_MNIST_DIR};
use la_data::{digits, fashion_mnist, info, Dataset, ImageSizes, Split};

#[test]
fn fashion_mnist_from_the_debian_package() {
    let dir = Path::new(FASHION_MNIST_DIR);
    assert!(
        dir.is_dir(),
        "{FASHION_MNIST_DIR} is missing: install it with `apt-get install -y dataset-fashion-mnist`"
    );
    for (split, count, per_class) in [(Split::Train, 60_000, 6_000), (Split::Test, 10_000, 1_000)] {
        let ds = fashion_mnist(dir, split).unwrap();
        assert_eq!(ds.len(), count);
        assert_eq!(ds.classes(), FASHION_MNIST_CLASSES);
        let report = info(&ds);
        assert_eq!(report.count, count);
        assert_eq!(report.histogram, vec![per_class; 10]);
        assert_eq!(report.errors, 0);
        assert_eq!(
            report.sizes,
            ImageSizes::Fixed {
                height: 28,
                width: 28
            }
        );
        let s = ds.get(0).unwrap();
        assert_eq!(s.image.data.len(), 28 * 28 * 3);
        // Grey replicated: all three channels equal.
        assert!(s.image.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(s.image.data.iter().any(|&v| v > 0));
    }
    // The first training label of Fashion-MNIST is 9 (ankle boot).
    assert_eq!(
        fashion_mnist(dir, Split::Train).unwrap().label(0).unwrap(),
        9
    );
}

#[test]
fn embedded_digits() {
    let ds = digits().unwrap();
    assert_eq!(ds.len(), 1797);
    assert_eq!(
        ds.classes(),
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    );
    let report = info(&ds);
    assert_eq!(report.histogram.len(), 10);
    assert_eq!(report.histogram.iter().sum::<usize>(), 1797);
    assert_eq!(report.histogram[0], 178);
    assert_eq!(report.histogram[8], 174);
    assert_eq!(
        report.sizes,
        ImageSizes::Fixed {
            height: 8,
            width: 8
        }
    );
    // First row of the CSV: 0,0,5,13,9,1,0,0,... label 0; 16 -> 255, 13 -> 207.
    let s = ds.get(0).unwrap();
    assert_eq!(s.label, 0);
    assert_eq!(s.image.pixel(0, 2), [80, 80, 80]);
    assert_eq!(s.image.pixel(0, 3), [207, 207, 207]);
    let max = (0..ds.len())
        .flat_map(|i| ds.get(i).unwrap().image.data)
        .max()
        .unwrap();
    assert_eq!(max, 255);
    let text = report.to_string();
    assert!(
        text.contains("samples:     1797") && text.contains("8 x 8"),
        "{text}"
    );
}
