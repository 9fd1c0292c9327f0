//! The enrichment worker: the stock sluice worker with a custom processor compiled in.
//! Run it with `processor: {custom: {name: enrich}}` in the configuration (or set the
//! StreamPipeline's `image` to an image of this binary).

use std::sync::Arc;

fn main() -> std::process::ExitCode {
    sluice_worker::run(Some(Arc::new(enrich_worker::Enrich::demo_table())))
}
