//! Statement parameters: each encoded in PostgreSQL's binary format once, before the
//! statement is sent, and reused as they are when it runs again.

use std::error::Error as StdError;

use postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// A parameter encoded in PostgreSQL's binary format once, before the statement, so that a
/// value that cannot be sent is found before anything is, and a statement run again (a
/// conflict, a reconnect) does not encode it again.
#[derive(Debug)]
pub(crate) struct Encoded(Vec<u8>);

impl Encoded {
    /// Encodes `value` as `ty`; fails when the value cannot be represented (the server
    /// would refuse it too, so callers treat it as refused data).
    pub(crate) fn new(
        value: &(dyn ToSql + Sync),
        ty: &Type,
    ) -> Result<Encoded, Box<dyn StdError + Sync + Send>> {
        let mut buf = bytes::BytesMut::new();
        match value.to_sql_checked(ty, &mut buf)? {
            IsNull::No => Ok(Encoded(buf.to_vec())),
            IsNull::Yes => Err("a NULL parameter".into()),
        }
    }
}

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        // Encoded for the statement's own parameter types by `Encoded::new`.
        true
    }

    to_sql_checked!();
}

/// `params` with their types, as an unnamed statement takes them.
pub(super) fn typed<'a>(
    params: &'a [Encoded],
    types: &[Type],
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .zip(types)
        .map(|(param, ty)| (param as &(dyn ToSql + Sync), ty.clone()))
        .collect()
}
