//! Print the StreamPipeline CRD as YAML: `cargo run -p sluice-controller --bin crdgen > crds/streampipeline.yaml`.

fn main() {
    print!("{}", sluice_controller::crd_yaml());
}
