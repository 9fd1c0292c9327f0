//! The checked-in CRD must be what the code generates.

#[test]
fn checked_in_crd_is_fresh() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds/streampipeline.yaml");
    let checked_in = std::fs::read_to_string(&path).expect("crds/streampipeline.yaml exists");
    assert!(
        checked_in == sluice_controller::crd_yaml(),
        "crds/streampipeline.yaml is stale: run `make crds` and commit the result"
    );
}
